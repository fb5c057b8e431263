"""`koifish plot`: train and eval loss of a run against tokens (or steps), as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from koifish_core.errors import KoifishError
from koifish_core.train.metrics import read_metrics


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.array([values[: i + 1].mean() for i in range(window - 1)])
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def plot_run(run_dir: Path, png: Path | None = None, x_axis: str = "tokens") -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KoifishError(f"{run_dir}: no such run folder")
    if x_axis not in ("tokens", "step"):
        raise KoifishError(f"--x: expected tokens or step, got {x_axis!r}")
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train" and isinstance(r.get("loss"), (int, float))]
    evals = [r for r in records if r["kind"] == "eval" and isinstance(r.get("loss"), (int, float))]
    events = [r for r in records if r["kind"] == "event"]
    if not train:
        raise KoifishError(f"{run_dir / 'metrics.jsonl'}: no train records to plot yet")

    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    # Only train lines carry the tokens seen so far (an eval line's `tokens` counts what it
    # evaluated): place every line by its step on the train lines' token axis.
    tokens_at = {r["step"]: r.get("tokens", r["step"]) for r in train}

    def xs(rs):
        return np.array([r["step"] if x_axis == "step" else tokens_at.get(r["step"], r["step"]) for r in rs])

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    loss = np.array([r["loss"] for r in train], dtype=float)
    ax.plot(xs(train), loss, color="tab:blue", alpha=0.25, linewidth=0.8)
    ax.plot(xs(train), _smooth(loss, max(1, len(loss) // 50)), color="tab:blue", label="train (smoothed)")
    if evals:
        ax.plot(xs(evals), [r["loss"] for r in evals], "o-", color="tab:orange", label="eval")
    for r in events:
        ax.axvline(xs([r])[0], color="tab:red", alpha=0.4, linewidth=0.8)
    ax.set_xlabel("tokens" if x_axis == "tokens" else "step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = Path(png) if png is not None else run_dir / "loss.png"
    fig.savefig(png)
    plt.close(fig)
    return png
