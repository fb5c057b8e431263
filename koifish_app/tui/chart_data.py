"""What the loss chart draws: smoothed, downsampled to the chart's width, finite, log-safe.

A terminal chart is ~70 columns wide; handing plotext 100,000 points costs a second per frame
and draws nothing more, so curves are reduced to a few points per column first.
"""

from __future__ import annotations

import numpy as np

SMOOTHING = (0, 10, 50, 200)
"""Moving-average windows the run screen cycles through (0 = raw)."""


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` points (fewer at the start), NaNs ignored; same length as values."""
    if window <= 1 or len(values) == 0:
        return values
    finite = np.isfinite(values)
    filled = np.where(finite, values, 0.0)
    csum = np.concatenate([[0.0], np.cumsum(filled)])
    ccount = np.concatenate([[0], np.cumsum(finite)])
    hi = np.arange(1, len(values) + 1)
    lo = np.maximum(hi - window, 0)
    counts = ccount[hi] - ccount[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, (csum[hi] - csum[lo]) / counts, np.nan)


def downsample(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Bucket means of (x, y) into at most max_points points; the last point is kept exactly."""
    n = len(x)
    if n <= max_points or max_points < 2:
        return x, y
    buckets = max_points - 1
    edges = np.linspace(0, n - 1, buckets + 1).astype(np.int64)  # the last point stays its own bucket
    sums_x = np.add.reduceat(x[: n - 1], edges[:-1])
    sums_y = np.add.reduceat(y[: n - 1], edges[:-1])
    sizes = np.diff(edges).astype(np.float64)
    keep = sizes > 0
    xs = np.append(sums_x[keep] / sizes[keep], x[-1])
    ys = np.append(sums_y[keep] / sizes[keep], y[-1])
    return xs, ys


def curve(x: np.ndarray, y: np.ndarray, window: int, max_points: int, log_y: bool) -> tuple[list, list]:
    """The points to draw for one series: finite (and positive on a log axis), smoothed, reduced."""
    y = moving_average(y, window)
    ok = np.isfinite(x) & np.isfinite(y)
    if log_y:
        ok &= y > 0
    x, y = downsample(x[ok], y[ok], max_points)
    return x.tolist(), y.tolist()
