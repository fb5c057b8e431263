"""Loss curves of one or several runs (textual-plotext), with EOE marks as vertical lines."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from textual_plotext import PlotextPlot

from koifish_app.tui.chart_data import curve
from koifish_app.tui.run_watch import RunWatch

COLORS = ("cyan", "orange", "green", "magenta", "yellow", "blue", "red", "white")


@dataclass
class ChartOptions:
    x_axis: str = "step"
    """"step" or "tokens" (the trainer's cumulative count on train lines)."""
    log_y: bool = False
    smoothing: int = 0
    """Moving-average window over logged points (0 = raw)."""
    show_eval: bool = True


@dataclass
class DrawnLine:
    label: str
    x: list = field(default_factory=list)
    y: list = field(default_factory=list)


def x_values(watch: RunWatch, x_axis: str, steps: np.ndarray) -> np.ndarray:
    """Steps on the chosen axis; eval lines sit on the train lines' token axis (their own
    `tokens` counts what they evaluated)."""
    if x_axis != "tokens" or len(watch.train) == 0:
        return steps
    train_steps, tokens = watch.train["step"], watch.train["tokens"]
    ok = np.isfinite(tokens)
    if not ok.any():
        return steps
    return np.interp(steps, train_steps[ok], tokens[ok])


class LossChart(PlotextPlot):
    """Redraws only when a run's data, the options or the width changed."""

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.drawn: list[DrawnLine] = []
        """What was handed to plotext last (tests and the status line read it)."""
        self.marks: list[float] = []
        self._key = None

    def show_runs(self, watches: list[RunWatch], options: ChartOptions) -> None:
        key = (tuple((w.run_dir, w.version) for w in watches), options.x_axis, options.log_y, options.smoothing,
               options.show_eval, self.size.width)
        if key == self._key:
            return
        self._key = key
        max_points = max(self.size.width, 40) * 2
        several = len(watches) > 1
        self.drawn, self.marks = [], []
        plt = self.plt
        plt.clear_figure()
        plt.xlabel("tokens" if options.x_axis == "tokens" else "step")
        if options.log_y:
            plt.yscale("log")
        for i, watch in enumerate(watches):
            color = COLORS[i % len(COLORS)]
            prefix = f"{watch.name} " if several else ""
            if len(watch.train):
                x = x_values(watch, options.x_axis, watch.train["step"])
                line = DrawnLine(prefix + "train", *curve(x, watch.train["loss"], options.smoothing, max_points,
                                                          options.log_y))
                self._draw_line(line, color)
            if options.show_eval and len(watch.evals):
                x = x_values(watch, options.x_axis, watch.evals["step"])
                line = DrawnLine(prefix + "eval", *curve(x, watch.evals["loss"], 0, max_points, options.log_y))
                self._draw_line(line, "red" if not several else color, marker="dot")
            if not several:
                for mark in watch.marks:
                    steps = np.array([float(mark.get("step", 0))])
                    self.marks.append(float(x_values(watch, options.x_axis, steps)[0]))
        for x in self.marks:
            plt.vline(x, "magenta")
        if not any(line.x for line in self.drawn):
            plt.title("no loss logged yet")
        self.refresh()

    def _draw_line(self, line: DrawnLine, color: str, marker: str | None = None) -> None:
        self.drawn.append(line)
        if line.x:
            kwargs = {"marker": marker} if marker else {}
            self.plt.plot(line.x, line.y, label=line.label, color=color, **kwargs)
