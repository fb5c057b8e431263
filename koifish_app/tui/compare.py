"""Several runs' loss curves overlaid, each in its own colour, with their latest numbers."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Static

from koifish_app.tui.chart_actions import ChartActions
from koifish_app.tui.chart_data import SMOOTHING
from koifish_app.tui.run import options_text
from koifish_app.tui.run_watch import RunWatch
from koifish_app.tui.widgets.format import num
from koifish_app.tui.widgets.loss_chart import COLORS, ChartOptions, LossChart
from koifish_app.tui.widgets.run_header import status_text


class CompareScreen(ChartActions, Screen):
    CSS_PATH = "compare.tcss"
    HELP = ("Train loss of the marked runs (or of all runs) on one chart. Tokens on the x axis compare runs "
            "with different batch sizes fairly; smoothing helps with noisy small-batch curves.")
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", id="compare.back"),
        Binding("l", "toggle_log", "Log", id="compare.log_scale"),
        Binding("m", "cycle_smoothing", "Smooth", id="compare.smoothing"),
        Binding("x", "toggle_x", "X axis", id="compare.x_axis"),
    ]

    def __init__(self, watches: list[RunWatch]):
        super().__init__()
        self.watches = watches
        self.options = ChartOptions(show_eval=False, smoothing=SMOOTHING[1])

    def compose(self) -> ComposeResult:
        yield Static("", id="compare-title")
        yield LossChart(id="compare-chart")
        yield Static("", id="compare-legend")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_data()
        self.set_interval(self.app.settings.refresh_s, self.refresh_data)

    def refresh_data(self) -> None:
        for watch in self.watches:
            watch.poll()
        self.query_one("#compare-title", Static).update(
            Text.assemble(("compare", "bold"), f"  {len(self.watches)} runs · {options_text(self.options)}"))
        self.query_one(LossChart).show_runs(self.watches, self.options)
        legend = Table.grid(padding=(0, 1))
        for i, watch in enumerate(self.watches):
            color = COLORS[i % len(COLORS)]
            step = "-" if watch.step is None else f"{watch.step:,}"
            legend.add_row(Text("■", style=color), watch.name, status_text(watch.status()), f"step {step}",
                           f"loss {num(watch.latest_loss)}", f"eval {num(watch.latest_eval)}")
        self.query_one("#compare-legend", Static).update(legend)

