"""One line on top of the run screen: name, status, step/total with a bar, ETA."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from koifish_app.tui.run_watch import RunWatch
from koifish_app.tui.widgets.format import bar, duration

STATUS_STYLES = {"running": "bold green", "starting": "bold green", "finished": "bold blue",
                 "stopped": "bold yellow", "failed": "bold red", "missing": "bold red", "unknown": "dim"}


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


class RunHeader(Static):
    def show(self, watch: RunWatch, status: str) -> None:
        line = Text.assemble((watch.name, "bold"), " ", status_text(status))
        step, total = watch.step, watch.total_steps
        if step is not None:
            line.append(f"  step {step:,}")
            if total:
                bar_width = max(8, min(30, self.size.width - len(line.plain) - 28))
                line.append(f"/{total:,} ")
                line.append(bar(step / total, bar_width), style="green")
                line.append(f" {100 * step / total:.0f}%")
        if status == "running":
            line.append(f"  ETA {duration(watch.eta_s())}")
        self.update(line)
