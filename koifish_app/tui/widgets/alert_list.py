"""Instability events, newest first: step, signal, value, action; unacknowledged ones highlighted."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from koifish_app.tui.run_watch import RunWatch
from koifish_app.tui.widgets.format import num

SHOWN = 50


class AlertList(Static):
    def show(self, watch: RunWatch) -> None:
        if not watch.alerts:
            self.update(Text("no instability events", style="dim"))
            return
        text = Text()
        for i in range(len(watch.alerts) - 1, max(len(watch.alerts) - SHOWN, 0) - 1, -1):
            ev = watch.alerts[i]
            fresh = i >= watch.acked
            line = (f"step {ev.get('step', '?'):>7} {str(ev.get('signal', '?')):<16} "
                    f"{num(ev.get('value'), 4):>9} -> {ev.get('action', '?')}")
            text.append(("● " if fresh else "  ") + line + "\n", style="bold black on yellow" if fresh else "")
        text.rstrip()
        self.update(text)
