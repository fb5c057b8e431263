"""Training instability: signals, a robust spike detector, and what to do about it.

Signals each step: a non-finite loss, gradient or parameter; a loss spike and a gradient-norm
spike (robust z-scores against the recent past); parameters that became non-finite after the
update. Actions: skip the update, lower the learning rate for a while and ramp it back, roll back
to the last good checkpoint (skipping the data that led into the spike, as PaLM did), and after
too many recoveries stop with a message naming the step, the signal and the tensor.

Why not the usual mean/std z-score over 128 steps (llm.c, OLMo-core): it sees nothing until the
window fills, and early in training the loss falls so fast that a plain z-score of "loss above
its mean" is meaningless. Here the reference is the median of the last few accepted values (a
falling loss lands below it, so a fast descent never alarms) and the scale is the median
absolute deviation of past residuals, which outliers barely move; flagged values never enter
the history. It works from `min_history` steps on.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, fields

from koifish_core.errors import ConfigError

ACTIONS = ("skip", "lower_lr", "rollback", "stop")


@dataclass
class InstabilityConfig:
    enabled: bool = True
    """Watch every step and act on what is found."""
    window: int = 128
    """Steps of history behind the robust statistics."""
    min_history: int = 16
    """Accepted steps needed before spikes are judged (about step 20 with the default)."""
    z_threshold: float = 6.0
    """Robust z-score above which the loss (or the log gradient norm) is a spike."""
    trend: int = 5
    """The reference value is the median of this many last accepted values."""
    grad_ratio: float = 20.0
    """A gradient-norm spike must also be this many times the recent median: early in training
    the norm can jump 5x within a few steps with the loss still falling (seen on the default case
    near the end of warm-up), and clipping already bounds what such a step can do."""
    spike_action: str = "lower_lr"
    """On a loss or gradient spike: skip (drop the update), lower_lr (drop it and lower the
    learning rate for a while), rollback or stop."""
    lr_factor: float = 0.5
    """lower_lr multiplies the learning rate by this..."""
    lr_recovery_steps: int = 50
    """...and ramps it back to the schedule over this many steps."""
    rollback_after: int = 3
    """Consecutive troubled steps after which the run rolls back to its last good checkpoint."""
    max_recoveries: int = 5
    """Rollbacks allowed before the run stops with a message."""

    @classmethod
    def from_dict(cls, raw: dict, source: str = "case") -> "InstabilityConfig":
        cfg, errors = cls(), []
        known = {f.name: f for f in fields(cls)}
        for key, value in (raw or {}).items():
            if key not in known:
                errors.append(f"instability.{key}: unknown key; known keys: {', '.join(known)}")
                continue
            want = type(getattr(cfg, key))
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
                errors.append(f"instability.{key}: expected {want.__name__}, got {value!r}")
                continue
            setattr(cfg, key, value)
        if cfg.spike_action not in ACTIONS:
            errors.append(f"instability.spike_action: expected one of {', '.join(ACTIONS)}, got {cfg.spike_action!r}")
        for key in ("window", "min_history", "trend", "lr_recovery_steps", "rollback_after", "max_recoveries"):
            if getattr(cfg, key) < 1:
                errors.append(f"instability.{key}: expected an integer >= 1, got {getattr(cfg, key)}")
        if cfg.grad_ratio < 1:
            errors.append(f"instability.grad_ratio: expected a number >= 1, got {cfg.grad_ratio}")
        if not 0 < cfg.lr_factor <= 1:
            errors.append(f"instability.lr_factor: expected a number in (0, 1], got {cfg.lr_factor}")
        if cfg.z_threshold <= 0:
            errors.append(f"instability.z_threshold: expected a positive number, got {cfg.z_threshold}")
        if errors:
            raise ConfigError(f"{source}: " + "; ".join(errors))
        return cfg


def _median(values) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


class RobustSpikeDetector:
    """z = (x - median(last `trend` accepted)) / (1.4826 * MAD of past residuals)."""

    def __init__(self, window: int, min_history: int, trend: int):
        self.values: deque[float] = deque(maxlen=trend)
        self.residuals: deque[float] = deque(maxlen=window)
        self.min_history = min_history

    def score(self, x: float) -> float | None:
        """The robust z-score of x, or None while there is too little history."""
        if len(self.residuals) < self.min_history:
            return None
        ref = _median(self.values)
        res = list(self.residuals)
        med = _median(res)
        mad = _median([abs(r - med) for r in res])
        scale = 1.4826 * mad + 1e-3 * max(abs(ref), 1e-6)  # a floor: a perfectly flat history is not zero noise
        return (x - ref) / scale

    def reference(self) -> float | None:
        return _median(self.values) if self.values else None

    def accept(self, x: float) -> None:
        if self.values:
            self.residuals.append(x - _median(self.values))
        self.values.append(x)


@dataclass
class Decision:
    apply_update: bool = True
    events: list[dict] = field(default_factory=list)
    """Event records for metrics.jsonl: signal, value, z, action (and tensor, message)."""


class InstabilityMonitor:
    """Judges each step before its update is applied, and the parameters after."""

    def __init__(self, cfg: InstabilityConfig):
        self.cfg = cfg
        self.loss = RobustSpikeDetector(cfg.window, cfg.min_history, cfg.trend)
        self.grad = RobustSpikeDetector(cfg.window, cfg.min_history, cfg.trend)
        self.troubled_in_a_row = 0
        self.recoveries = 0
        self.lr_low_until = -1
        self.lr_low_from = -1

    def lr_factor(self, step: int) -> float:
        """Multiplier of the scheduled learning rate: lowered after a spike, ramped back linearly."""
        if step > self.lr_low_until:
            return 1.0
        span = max(1, self.lr_low_until - self.lr_low_from)
        done = (step - self.lr_low_from) / span
        return self.cfg.lr_factor + (1.0 - self.cfg.lr_factor) * max(0.0, done)

    def before_update(self, step: int, loss: float, grad_norm: float) -> Decision:
        d = Decision()
        if not self.cfg.enabled:
            return d
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            signal = "nonfinite_loss" if not math.isfinite(loss) else "nonfinite_grad"
            d.apply_update = False
            d.events.append({"signal": signal, "value": loss if signal == "nonfinite_loss" else grad_norm,
                             "z": None, "action": "skip"})
        else:
            lz = self.loss.score(loss)
            log_norm = math.log(max(grad_norm, 1e-12))
            gz = self.grad.score(log_norm)
            if gz is not None and log_norm - self.grad.reference() < math.log(self.cfg.grad_ratio):
                gz = min(gz, self.cfg.z_threshold)  # a large z but a modest jump: not a spike
            spikes = [(s, v, z) for s, v, z in (("loss_spike", loss, lz), ("grad_norm_spike", grad_norm, gz))
                      if z is not None and z > self.cfg.z_threshold]
            for s, v, z in spikes:
                action = self.cfg.spike_action
                d.events.append({"signal": s, "value": v, "z": round(z, 2), "action": action})
            if spikes:
                d.apply_update = False
                if self.cfg.spike_action == "lower_lr":
                    self.lr_low_from, self.lr_low_until = step, step + self.cfg.lr_recovery_steps
            else:
                self.loss.accept(loss)  # outliers never enter the history
                self.grad.accept(math.log(max(grad_norm, 1e-12)))
        self.troubled_in_a_row = self.troubled_in_a_row + 1 if d.events else 0
        if d.events and self.troubled_in_a_row >= self.cfg.rollback_after:
            d.events[-1]["action"] = "rollback"  # skipping alone has not helped: go back to good weights
        return d

    def restart_history(self) -> None:
        """After a rollback the recent past describes weights that no longer exist: start over."""
        self.loss = RobustSpikeDetector(self.cfg.window, self.cfg.min_history, self.cfg.trend)
        self.grad = RobustSpikeDetector(self.cfg.window, self.cfg.min_history, self.cfg.trend)
        self.troubled_in_a_row = 0
