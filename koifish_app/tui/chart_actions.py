"""The chart toggles shared by the run and compare screens (log scale, smoothing, x axis).

A screen using it has `options` (a ChartOptions) and `refresh_data()`.
"""

from __future__ import annotations

from koifish_app.tui.chart_data import SMOOTHING


class ChartActions:
    def action_toggle_log(self) -> None:
        self.options.log_y = not self.options.log_y
        self.refresh_data()

    def action_cycle_smoothing(self) -> None:
        i = SMOOTHING.index(self.options.smoothing) if self.options.smoothing in SMOOTHING else 0
        self.options.smoothing = SMOOTHING[(i + 1) % len(SMOOTHING)]
        self.refresh_data()

    def action_toggle_x(self) -> None:
        self.options.x_axis = "tokens" if self.options.x_axis == "step" else "step"
        self.refresh_data()
