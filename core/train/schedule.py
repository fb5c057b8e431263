"""Learning rate as a pure function of the step: linear warm-up, then cosine, linear or constant."""

from __future__ import annotations

import math

from koifish_core.config.schema import ScheduleConfig


def lr_at(step: int, total_steps: int, peak: float, cfg: ScheduleConfig) -> float:
    """Learning rate of optimizer step `step` (0-based) out of `total_steps`."""
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps  # llm.c's warm-up: never exactly zero
    floor = peak * cfg.min_lr_ratio
    if cfg.decay == "constant" or total_steps <= cfg.warmup_steps + 1:
        return peak
    progress = min(1.0, (step - cfg.warmup_steps) / (total_steps - 1 - cfg.warmup_steps))
    if cfg.decay == "linear":
        return peak - (peak - floor) * progress
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
