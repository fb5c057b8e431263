"""Where a training step runs. The trainer talks to an Engine only; CPU and CUDA engines differ
inside, and hold the same named tensors, so checkpoints move freely between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class StepResult:
    loss: float
    """Mean loss over the step's micro-batches."""
    grad_norm: float
    """Global gradient norm before clipping."""
    applied: bool = True
    """False when the update was skipped (non-finite gradients)."""


class Engine(Protocol):
    n_params: int
    shards_optimizer: bool
    """True when optimizer state is split over data-parallel ranks (ZeRO-1): every rank must then
    call optim_tensors(), which gathers it."""

    def attach_collective(self, collective, dist_cfg) -> None:
        """Join a data-parallel job (dist_cfg: the case's `dist` block), before the first step and
        before a checkpoint is loaded."""

    def train_step(self, batches: list[tuple[np.ndarray, np.ndarray]], lr: float, gate=None,
                   poison_grads: bool = False) -> StepResult:
        """Forward and backward over the micro-batches, gradient mean, clipping, one AdamW update.
        gate(loss, grad_norm, signals) -> bool is asked before the update is kept (False: no update;
        signals: update_ratio per tensor group, max_logit, tensor); poison_grads makes the gradient
        non-finite (fault injection)."""

    def poison_params(self) -> None:
        """Fault injection: one weight becomes infinite."""

    def nonfinite_tensor(self) -> str | None:
        """Name of the first parameter tensor holding NaN or Inf, if any."""

    def watch_weights(self, on: bool) -> None:
        """Whether nonfinite_tensor will be asked after every step (the instability monitor's check),
        before the first step: an engine may then prepare a cheaper answer as it updates."""

    def eval_loss(self, x: np.ndarray, y: np.ndarray) -> float:
        """Mean loss of one batch, no gradients."""

    def model_tensors(self) -> dict[str, np.ndarray]:
        """Weights by name (float32 host arrays), as checkpoints store them."""

    def optim_tensors(self) -> dict[str, np.ndarray]:
        """Optimizer state by name (host arrays)."""

    def load_tensors(self, model: dict[str, np.ndarray], optim: dict[str, np.ndarray] | None, where) -> None:
        """Restore weights (and optimizer state when given) bit for bit."""
