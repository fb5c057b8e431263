"""The run screen: loss chart, latest values, machine health and instability alerts of one run,
re-read every refresh (only the bytes appended since the last one)."""

from __future__ import annotations

import time

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static

from koifish_app.tui.chart_actions import ChartActions
from koifish_app.tui.run_control import ControlError, request_stop, resume
from koifish_app.tui.run_watch import RunWatch
from koifish_app.tui.widgets.alert_badge import AlertBadge
from koifish_app.tui.widgets.alert_list import AlertList
from koifish_app.tui.widgets.loss_chart import ChartOptions, LossChart
from koifish_app.tui.widgets.run_header import RunHeader
from koifish_app.tui.widgets.run_values import RunValues
from koifish_app.tui.widgets.system_panel import SystemPanel


BACKLOG_BYTES = 4 << 20
"""Unread metrics beyond this are parsed in a worker thread (100,000 steps are ~18 MB, ~0.6 s)."""


def options_text(options: ChartOptions) -> str:
    smooth = f"smooth {options.smoothing}" if options.smoothing else "raw"
    return f"x: {options.x_axis} · {smooth} · {'log' if options.log_y else 'linear'}"


class RunScreen(ChartActions, Screen):
    CSS_PATH = "run.tcss"
    HELP = ("One run, refreshed every second while it writes. The chart shows train loss (and eval loss as "
            "dots) against steps or tokens; magenta lines mark expert switches and evolution (EOE). The "
            "badge counts instability alerts until you acknowledge them with a. s asks the trainer to "
            "checkpoint and stop (it creates RUN_DIR/STOP); r resumes a stopped run as a child process "
            "(`koifish train --resume --out RUN_DIR`, output in RUN_DIR/tui-train.log).")
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", id="run.back"),
        Binding("l", "toggle_log", "Log", id="run.log_scale"),
        Binding("m", "cycle_smoothing", "Smooth", id="run.smoothing"),
        Binding("x", "toggle_x", "X axis", id="run.x_axis"),
        Binding("e", "toggle_eval", "Eval", id="run.eval", show=False),
        Binding("a", "acknowledge", "Ack", id="run.ack"),
        Binding("s", "stop_run", "Stop", id="run.stop"),
        Binding("r", "resume_run", "Resume", id="run.resume"),
    ]

    def __init__(self, watch: RunWatch):
        super().__init__()
        self.watch_ = watch  # `watch` is Textual's reactive-watcher API on DOM nodes
        self.options = ChartOptions()
        self.refresh_ms: float | None = None
        """How long the last refresh took (for the 100 ms budget; shown in the title)."""

    def compose(self) -> ComposeResult:
        yield RunHeader(id="run-header")
        yield Static("", id="run-message")
        with Horizontal(id="run-body"):
            yield LossChart(id="loss-chart")
            with Vertical(id="run-side"):
                yield RunValues(id="run-values")
                yield SystemPanel(id="system-panel")
        with Horizontal(id="run-alerts-bar"):
            yield AlertBadge(id="alert-badge")
            yield Static("", id="chart-options")
        with VerticalScroll(id="alert-scroll"):
            yield AlertList(id="alert-list")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = str(self.watch_.run_dir)
        self.refresh_data()
        self.set_interval(self.app.settings.refresh_s, self.refresh_data)

    def refresh_data(self) -> None:
        t0 = time.perf_counter()
        watch = self.watch_
        if watch.loading:
            return
        backlog = watch.unread_bytes()
        if backlog > BACKLOG_BYTES:
            self.query_one("#run-message", Static).update(Text(f"reading {backlog / 2**20:.0f} MB of metrics…",
                                                               style="dim"))
            self._read_backlog()
            return
        watch.poll()
        status = watch.status()
        self.query_one(RunHeader).show(watch, status)
        self.query_one("#run-message", Static).update(self._message(status))
        self.query_one(LossChart).show_runs([watch], self.options)
        self.query_one(RunValues).show(watch)
        self.query_one(AlertBadge).show(watch.unacked)
        self.query_one(AlertList).show(watch)
        self.query_one("#chart-options", Static).update(options_text(self.options))
        try:
            self.query_one(SystemPanel).show(self.app.system_stats.read())
        except Exception as e:  # a stats reader must never take the run view down
            self.query_one(SystemPanel).update(Text(f"stats: {e}", style="dim"))
        self.refresh_ms = 1000 * (time.perf_counter() - t0)

    @work(thread=True, exclusive=True, group="backlog")
    def _read_backlog(self) -> None:
        self.watch_.poll()
        self.app.call_from_thread(self.refresh_data)

    def _message(self, status: str) -> Text | str:
        watch = self.watch_
        if watch.error is not None:
            return Text(watch.error, style="bold red")
        if watch.case_error is not None:
            return Text(watch.case_error, style="bold red")
        if status == "failed":
            why = next((r.get("message") for r in reversed(watch.run_records) if r.get("message")), None)
            why = why or watch.child_log_tail()
            return Text(f"failed: {why}" if why else "failed", style="bold red")
        if watch.tail.mtime is None:
            if status == "starting":
                return Text("trainer starting…", style="dim")
            return Text(f"{watch.run_dir}: no metrics.jsonl yet (not a run, or one that has not started)",
                        style="yellow")
        if watch.tail.bad_lines:
            return Text(f"{watch.tail.path}: {watch.tail.bad_lines} unreadable line(s) skipped", style="yellow")
        return ""

    # ---- actions ----


    def action_toggle_eval(self) -> None:
        self.options.show_eval = not self.options.show_eval
        self.refresh_data()

    def action_acknowledge(self) -> None:
        self.watch_.acknowledge()
        self.refresh_data()

    def action_stop_run(self) -> None:
        try:
            self.notify(request_stop(self.watch_))
        except ControlError as e:
            self.notify(str(e), severity="warning")

    def action_resume_run(self) -> None:
        try:
            child = resume(self.watch_, cwd=self.app.settings.cwd)
        except ControlError as e:
            self.notify(str(e), severity="warning")
            return
        self.notify(f"resuming {self.watch_.name} (pid {child.pid})")
        self.refresh_data()
