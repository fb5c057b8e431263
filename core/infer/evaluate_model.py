"""`koifish eval`: mean next-token cross-entropy over consecutive windows of token shards.

The token stream (all shards, in order) is cut into windows of T inputs and their T next tokens;
the tail that cannot fill a window is dropped, so the number is comparable across tools.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from koifish_core.errors import KoifishError


@dataclass
class EvalResult:
    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))


def evaluate_model(model_path: Path, data: str, seq_len: int | None = None, batch_size: int = 8,
                   max_windows: int | None = None, device: str = "cpu") -> EvalResult:
    from koifish_core.data.loader import iter_windows, resolve_paths
    from koifish_core.models.from_path import open_model

    if device != "cpu":
        raise KoifishError(f"--device {device}: `koifish eval` runs on the CPU path for now")
    if batch_size <= 0:
        raise KoifishError(f"--batch-size: expected a positive number, got {batch_size}")
    opened = open_model(model_path)
    T = seq_len or opened.n_ctx
    if not 0 < T <= opened.n_ctx:
        raise KoifishError(f"--seq-len: expected 1..{opened.n_ctx} (the model's context), got {T}")
    paths = resolve_paths(data)

    total, count, windows = 0.0, 0, 0
    batch_x, batch_y = [], []

    def flush():
        nonlocal total, count
        x, y = np.stack(batch_x), np.stack(batch_y)
        _, loss = opened.model.forward(x, y)
        total += float(loss) * y.size  # the model's loss is a mean over the batch's tokens
        count += y.size
        batch_x.clear()
        batch_y.clear()

    for x, y in iter_windows(paths, T):
        batch_x.append(x)
        batch_y.append(y)
        windows += 1
        if len(batch_x) == batch_size:
            flush()
        if max_windows is not None and windows >= max_windows:
            break
    if batch_x:
        flush()
    if count == 0:
        raise KoifishError(f"{data}: fewer than {T + 1} tokens, not one window of --seq-len {T} to evaluate")
    return EvalResult(loss=total / count, tokens=count)
