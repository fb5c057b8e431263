"""Training instability: signals, a robust spike detector, and what to do about it.

Signals each step: a non-finite loss, gradient or parameter; a loss spike and a gradient-norm
spike (robust z-scores against the recent past); the update-to-weight ratio per tensor group and
the largest logit (hard limits, judged before the update is applied). Actions: skip the update,
lower the learning rate for a while and ramp it back, roll back to the last good checkpoint
(skipping the data that led into the spike, as PaLM did), and after too many recoveries stop
with a message naming the step, the signal and the tensor.

Why not the usual mean/std z-score over 128 steps (llm.c, OLMo-core): it sees nothing until the
window fills, and early in training the loss falls so fast that a plain z-score of "loss above
its mean" is meaningless. Here the reference follows the recent past (a robust trend line through
the last few accepted values, never below their median), so a fast descent lands below it and
never alarms, and the scale is the median absolute deviation of past residuals, which outliers
barely move; flagged values never enter the history. It works from `min_history` steps on.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, fields

import numpy as np

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
    trend: int = 8
    """Last accepted values the local (Theil-Sen) trend line is fitted to."""
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
    max_update_ratio: float = 1.0
    """Largest update-to-weight ratio ||dw|| / ||w|| of a tensor group in one step (0 = off). Healthy
    AdamW steps sit near lr / rms(w), about 1e-3 to 0.1; a step that moves a group by its own size
    is a blow-up whatever the loss says."""
    max_logit: float = 1000.0
    """Largest |logit| allowed (0 = off): logits that grow without bound precede divergence (the
    reason for PaLM's z-loss); healthy GPT-2 training stays below about 50."""
    update_sample: int = 8
    """With more than 1 the CUDA engine measures the update statistics of a tensor of at least 8 x
    this many 16k-element chunks (1M+ elements at 8) on one chunk in this many, a different one
    each step, scaled to the whole tensor; 1: every element. That pass reads weights, gradients and
    both moments (25 GB a step at GPT-2 1558M): at 8 the norm graph of GPT-2 124M took 0.48 ms
    instead of 0.97 (H200). The CPU engine measures every element."""

    @classmethod
    def from_dict(cls, raw: dict, source: str = "case") -> "InstabilityConfig":
        cfg, errors = cls.parse(raw)
        if errors:
            raise ConfigError(f"{source}: " + "; ".join(errors))
        return cfg

    @classmethod
    def parse(cls, raw) -> tuple["InstabilityConfig", list[str]]:
        """The settings and every problem with them, each naming its key (instability.KEY: ...)."""
        cfg, errors = cls(), []
        if raw is not None and not isinstance(raw, dict):
            return cfg, [f"instability: expected an object of settings, got {type(raw).__name__}"]
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
            if want is float and not math.isfinite(value):
                errors.append(f"instability.{key}: expected a finite number, got {value!r}")
                continue
            setattr(cfg, key, value)
        if cfg.spike_action not in ACTIONS:
            errors.append(f"instability.spike_action: expected one of {', '.join(ACTIONS)}, got {cfg.spike_action!r}")
        for key in ("window", "min_history", "trend", "lr_recovery_steps", "rollback_after", "max_recoveries",
                    "update_sample"):
            if getattr(cfg, key) < 1:
                errors.append(f"instability.{key}: expected an integer >= 1, got {getattr(cfg, key)}")
        for key in ("max_update_ratio", "max_logit"):
            if getattr(cfg, key) < 0:
                errors.append(f"instability.{key}: expected a number >= 0 (0 = off), got {getattr(cfg, key)}")
        if cfg.grad_ratio < 1:
            errors.append(f"instability.grad_ratio: expected a number >= 1, got {cfg.grad_ratio}")
        if not 0 < cfg.lr_factor <= 1:
            errors.append(f"instability.lr_factor: expected a number in (0, 1], got {cfg.lr_factor}")
        if cfg.z_threshold <= 0:
            errors.append(f"instability.z_threshold: expected a positive number, got {cfg.z_threshold}")
        return cfg, errors


def _median(values) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


class RobustSpikeDetector:
    """z = (x - reference) / (1.4826 * MAD of past trend residuals).

    The reference is the higher of two guesses at the next value: the extrapolation of a robust
    (Theil-Sen) line through the last `trend` accepted values, and the median of the last three.
    The line follows a slow rise (a trend is not a spike) and makes the noise estimate free of the
    trend; the median keeps a falling loss, or a fall that stops abruptly, from ever alarming. The
    scale comes from the residuals against the line only, so it measures noise, not descent."""

    RECENT = 3

    def __init__(self, window: int, min_history: int, trend: int):
        self.points: deque[tuple[int, float]] = deque(maxlen=max(trend, self.RECENT))
        self.residuals: deque[float] = deque(maxlen=window)
        self.min_history = min_history

    def _line(self, step: int) -> float | None:
        pts = list(self.points)
        if len(pts) < 3:
            return None
        slopes = [(xj - xi) / (tj - ti) for i, (ti, xi) in enumerate(pts) for tj, xj in pts[i + 1:]]
        slope = _median(slopes)
        return _median([x - slope * t for t, x in pts]) + slope * step

    def reference(self, step: int) -> float | None:
        if not self.points:
            return None
        recent = _median([x for _, x in list(self.points)[-self.RECENT:]])
        line = self._line(step)
        return recent if line is None else max(line, recent)

    def score(self, step: int, x: float) -> float | None:
        """The robust z-score of x at this step, or None while there is too little history."""
        if len(self.residuals) < self.min_history:
            return None
        ref = self.reference(step)
        res = list(self.residuals)
        med = _median(res)
        mad = _median([abs(r - med) for r in res])
        scale = 1.4826 * mad + 1e-3 * max(abs(ref), 1e-6)  # a floor: a perfectly flat history is not zero noise
        return (x - ref) / scale

    def accept(self, step: int, x: float) -> None:
        line = self._line(step)
        if line is not None:
            self.residuals.append(x - line)
        self.points.append((step, x))


# ---- signals computed from arrays (the engines call these) ---------------------------------------
def tensor_group(name: str) -> str:
    """The group a tensor's update ratio is judged in: wte, wpe, attn, mlp, ln (biases with their
    weights, so a zero-initialised bias never divides by zero)."""
    for group in ("attn", "mlp"):
        if f".{group}." in name:
            return group
    if "ln_" in name:
        return "ln"
    return name.split(".")[0]


def update_ratios(weights: dict, updates: dict) -> dict[str, float]:
    """||update|| / ||weights before the update|| per tensor group (float64 sums)."""
    upd_sq, w_sq = {}, {}
    for name, w in weights.items():
        u = np.asarray(updates[name], dtype=np.float64).ravel()
        w = np.asarray(w, dtype=np.float64).ravel()
        upd_sq[name], w_sq[name] = float(u @ u), float(w @ w)
    return group_ratios(upd_sq, w_sq)


class TensorGroups:
    """Tensor names mapped once to their groups (tensor_group, in order of first appearance), so that
    per-tensor sums in the names' order are summed by group with one bincount: the CUDA engine's gate
    waits on this every step with the GPU idle (dicts built a tensor at a time took ~0.25 ms)."""

    def __init__(self, names):
        self.names = list(names)
        self.groups = list(dict.fromkeys(tensor_group(n) for n in self.names))
        self.index = np.array([self.groups.index(tensor_group(n)) for n in self.names], dtype=np.intp)

    def ratios(self, upd_sq, w_sq) -> dict[str, float]:
        """Per group, sqrt(sum of squared updates) / sqrt(sum of squared weights) (at least 1e-12)."""
        n = len(self.groups)
        num = np.sqrt(np.bincount(self.index, weights=np.asarray(upd_sq, np.float64), minlength=n))
        den = np.sqrt(np.bincount(self.index, weights=np.asarray(w_sq, np.float64), minlength=n))
        return dict(zip(self.groups, (num / np.maximum(den, 1e-12)).tolist()))


def group_ratios(upd_sq: dict[str, float], w_sq: dict[str, float]) -> dict[str, float]:
    """Per tensor group, sqrt(sum of squared updates) / sqrt(sum of squared weights), from the
    per-tensor sums (what the CUDA engine's update_stats kernel measures)."""
    names = list(upd_sq)
    return TensorGroups(names).ratios([upd_sq[n] for n in names], [w_sq[n] for n in names])


def max_abs_logit(logits) -> float:
    return float(np.max(np.abs(logits))) if np.size(logits) else 0.0


def largest_tensor(norms: dict[str, float]) -> str | None:
    """The tensor to blame: the one with the largest (gradient) norm."""
    return max(norms, key=norms.get) if norms else None


# ---- the verdict of one step --------------------------------------------------------------------
SEVERITY = {"skip": 1, "lower_lr": 2, "rollback": 3, "stop": 4}


@dataclass
class Decision:
    step: int = 0
    apply_update: bool = True
    """False: drop this step's update (whatever the action says about what follows)."""
    events: list[dict] = field(default_factory=list)
    """Event records for metrics.jsonl: signal, value, z, action (and tensor when known)."""

    @property
    def worst(self) -> dict | None:
        return max(self.events, key=lambda e: SEVERITY[e["action"]]) if self.events else None

    @property
    def action(self) -> str | None:
        """The most severe action asked for (None: all is well)."""
        return self.worst["action"] if self.events else None

    @property
    def signal(self) -> str | None:
        return self.worst["signal"] if self.events else None

    @property
    def value(self):
        return self.worst["value"] if self.events else None

    @property
    def z(self) -> float | None:
        return self.worst["z"] if self.events else None

    @property
    def message(self) -> str:
        if not self.events:
            return f"step {self.step}: no instability"
        return "; ".join(describe(self.step, e) for e in self.events)


def describe(step: int, event: dict) -> str:
    """One line for a person: step 200: loss_spike 9.1 (z 14.2) -> lower_lr."""
    value = event.get("value")
    text = f"step {step}: {event['signal']} {value:.4g}" if isinstance(value, float) else \
        f"step {step}: {event['signal']} {value}"
    if event.get("z") is not None:
        text += f" (z {event['z']})"
    if event.get("tensor"):
        text += f" in {event['tensor']}"
    return f"{text} -> {event['action']}"


class InstabilityMonitor:
    """Judges each step before its update is applied."""

    def __init__(self, cfg: InstabilityConfig):
        self.cfg = cfg
        self.loss = RobustSpikeDetector(cfg.window, cfg.min_history, cfg.trend)
        self.grad = RobustSpikeDetector(cfg.window, cfg.min_history, cfg.trend)
        self.troubled_in_a_row = 0
        self.lr_low_until = -1
        self.lr_low_from = -1

    def lr_factor(self, step: int) -> float:
        """Multiplier of the scheduled learning rate: lowered after a spike, ramped back linearly."""
        if not self.lr_low_from <= step <= self.lr_low_until:
            return 1.0  # before the spike (a resumed or rolled-back run asks about any step) or after the ramp
        span = max(1, self.lr_low_until - self.lr_low_from)
        done = (step - self.lr_low_from) / span
        return self.cfg.lr_factor + (1.0 - self.cfg.lr_factor) * max(0.0, done)

    def observe(self, step: int, loss: float, grad_norm: float, update_ratio=None, max_logit: float | None = None,
                nonfinite: bool | str = False, tensor: str | None = None) -> Decision:
        """The verdict on one step. update_ratio: a number or {group: ratio}; nonfinite: True (or the
        tensor's name) when a parameter holds NaN/Inf; tensor: whom to blame for a gradient spike."""
        d = Decision(step=step)
        if not self.cfg.enabled:
            return d
        cfg = self.cfg
        if nonfinite:
            d.events.append({"signal": "nonfinite_param", "value": None, "z": None, "action": "rollback",
                             **({"tensor": nonfinite} if isinstance(nonfinite, str) else {})})
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            signal = "nonfinite_loss" if not math.isfinite(loss) else "nonfinite_grad"
            d.events.append({"signal": signal, "value": loss if signal == "nonfinite_loss" else grad_norm,
                             "z": None, "action": "skip"})
        else:
            spikes = self._spikes(step, loss, grad_norm, tensor)
            spikes += self._limits(update_ratio, max_logit)
            d.events += [dict(e, action=cfg.spike_action) for e in spikes]
            if spikes and cfg.spike_action == "lower_lr":
                self.lr_low_from, self.lr_low_until = step, step + cfg.lr_recovery_steps
        d.apply_update = not d.events
        self.troubled_in_a_row = self.troubled_in_a_row + 1 if d.events else 0
        if d.events and self.troubled_in_a_row >= cfg.rollback_after and d.action in ("skip", "lower_lr"):
            d.events[-1]["action"] = "rollback"  # skipping alone has not helped: go back to good weights
        return d

    def _spikes(self, step: int, loss: float, grad_norm: float, tensor: str | None) -> list[dict]:
        """Robust z-scores of the loss and log gradient norm; each value enters its history only
        when it is not itself an outlier."""
        out = []
        lz = self.loss.score(step, loss)
        if lz is not None and lz > self.cfg.z_threshold:
            out.append({"signal": "loss_spike", "value": loss, "z": round(lz, 2)})
        else:
            self.loss.accept(step, loss)
        log_norm = math.log(max(grad_norm, 1e-12))
        gz = self.grad.score(step, log_norm)
        if gz is not None and gz > self.cfg.z_threshold and \
                log_norm - self.grad.reference(step) >= math.log(self.cfg.grad_ratio):  # a large z and a large jump
            out.append({"signal": "grad_norm_spike", "value": grad_norm, "z": round(gz, 2),
                        **({"tensor": tensor} if tensor else {})})
        else:
            self.grad.accept(step, log_norm)
        return out

    def _limits(self, update_ratio, max_logit) -> list[dict]:
        out = []
        if update_ratio is not None and self.cfg.max_update_ratio > 0:
            ratios = update_ratio if isinstance(update_ratio, dict) else {None: update_ratio}
            group = max(ratios, key=lambda g: ratios[g] if math.isfinite(ratios[g]) else math.inf)
            if not ratios[group] <= self.cfg.max_update_ratio:  # NaN counts as too large
                out.append({"signal": "update_ratio", "value": ratios[group], "z": None,
                            **({"tensor": group} if group else {})})
        if max_logit is not None and self.cfg.max_logit > 0 and not max_logit <= self.cfg.max_logit:
            out.append({"signal": "max_logit", "value": max_logit, "z": None})
        return out

    def restart_history(self) -> None:
        """After a rollback the recent past describes weights that no longer exist: start over."""
        self.loss = RobustSpikeDetector(self.cfg.window, self.cfg.min_history, self.cfg.trend)
        self.grad = RobustSpikeDetector(self.cfg.window, self.cfg.min_history, self.cfg.trend)
        self.troubled_in_a_row = 0
