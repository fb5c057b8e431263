"""The instability monitor on synthetic curves (no trainer): robust spike detection from about
step 20, no false alarm while the loss falls fast, limits on update ratio and logits, actions."""

import math

import numpy as np
import pytest

from koifish_core.errors import ConfigError
from koifish_core.train.instability import (
    InstabilityConfig,
    InstabilityMonitor,
    max_abs_logit,
    tensor_group,
    update_ratios,
)


def _curve(n, seed, spikes=(), size=4.0):
    """A loss falling fast then slowly (as in early training), with noise; grad norms to match."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, n + 1)
    loss = 3.0 + 8.0 * np.exp(-t / 30.0) + 0.6 * np.exp(-t / 400.0) + rng.normal(0, 0.08, n)
    grad = np.exp(rng.normal(0, 0.25, n)) * (0.5 + 2.0 * np.exp(-t / 50.0))
    for s in spikes:
        loss[s - 1] += size
    return loss, grad


def _alarms(loss, grad, cfg=None):
    mon = InstabilityMonitor(cfg or InstabilityConfig())
    out = []
    for step, (l, g) in enumerate(zip(loss, grad), 1):
        d = mon.observe(step, float(l), float(g))
        out += [(step, e["signal"]) for e in d.events]
    return out


@pytest.mark.parametrize("seed", range(5))
def test_no_false_alarm_while_the_loss_falls_fast(seed):
    loss, grad = _curve(3000, seed)
    assert _alarms(loss, grad) == []


def test_no_false_alarm_on_a_steeper_and_noisier_start():
    """Loss from 11 to 4 in 40 steps, noise shrinking with the loss: the median reference follows."""
    rng = np.random.default_rng(11)
    t = np.arange(1, 2001)
    loss = 4.0 + 7.0 * np.exp(-t / 12.0)
    loss = loss + rng.normal(0, 0.02, t.size) * loss
    grad = np.exp(rng.normal(0, 0.3, t.size)) * (0.4 + 5.0 * np.exp(-t / 20.0))
    assert _alarms(loss, grad) == []


@pytest.mark.parametrize("size", [1.0, 2.0, 8.0, 50.0])
def test_spikes_of_several_sizes_are_caught_at_their_step(size):
    loss, grad = _curve(2500, 1, spikes=(25, 200, 2000), size=size)
    assert [s for s, sig in _alarms(loss, grad) if sig == "loss_spike"] == [25, 200, 2000]


def test_detection_starts_near_step_20_not_after_the_window():
    loss, grad = _curve(100, 5, spikes=(20,))
    assert _alarms(loss, grad) == [(20, "loss_spike")]
    assert InstabilityConfig().window == 128  # ...though the window is llm.c's 128 steps


def test_grad_norm_spike_and_nonfinite_values():
    loss, grad = _curve(300, 2)
    grad[149] *= 50
    loss[199] = math.nan
    grad[249] = math.inf
    assert _alarms(loss, grad) == [(150, "grad_norm_spike"), (200, "nonfinite_loss"), (250, "nonfinite_grad")]


def test_nonfinite_values_are_caught_from_the_first_step():
    mon = InstabilityMonitor(InstabilityConfig())
    d = mon.observe(1, math.inf, 1.0)
    assert (d.signal, d.action, d.apply_update) == ("nonfinite_loss", "skip", False)


def test_a_modest_grad_norm_jump_is_not_a_spike():
    """A 5x jump (the default case at the end of warm-up) is below grad_ratio (20x)."""
    loss, grad = _curve(300, 2)
    grad[149] *= 5
    assert _alarms(loss, grad) == []


def test_a_gradual_rise_is_not_a_spike():
    loss, grad = _curve(600, 3)
    loss[300:] += np.linspace(0, 1.5, 300)  # slow divergence: a trend, not a spike
    assert [a for a in _alarms(loss, grad) if a[1] == "loss_spike"] == []


def test_outliers_stay_out_of_the_history():
    loss, grad = _curve(400, 4, spikes=range(100, 106))  # six spikes in a row: each one is still caught
    assert [s for s, sig in _alarms(loss, grad) if sig == "loss_spike"] == list(range(100, 106))


def _warm(cfg=None, steps=40):
    """A monitor that has seen `steps` quiet steps of a flat-ish noisy loss."""
    mon = InstabilityMonitor(cfg or InstabilityConfig())
    loss, grad = _curve(steps, 9)
    for step, (l, g) in enumerate(zip(loss, grad), 1):
        assert mon.observe(step, float(l), float(g)).action is None
    return mon, float(loss[-1]), float(grad[-1])


def test_decision_names_signal_value_z_and_action():
    mon, l, g = _warm()
    d = mon.observe(41, l + 5.0, g)
    assert (d.action, d.signal, d.apply_update) == ("lower_lr", "loss_spike", False)
    assert d.value == pytest.approx(l + 5.0) and d.z > 6
    assert d.message.startswith("step 41: loss_spike") and d.message.endswith("-> lower_lr")
    quiet = mon.observe(42, l, g)
    assert (quiet.action, quiet.signal, quiet.apply_update) == (None, None, True)


@pytest.mark.parametrize("action", ["skip", "rollback", "stop"])
def test_the_spike_action_is_configurable(action):
    mon, l, g = _warm(InstabilityConfig(spike_action=action))
    assert mon.observe(41, l + 5.0, g).action == action
    assert mon.lr_factor(42) == 1.0  # only lower_lr touches the learning rate


def test_lower_lr_halves_then_ramps_back():
    mon, l, g = _warm(InstabilityConfig(lr_factor=0.5, lr_recovery_steps=50))
    mon.observe(41, l + 5.0, g)
    assert [mon.lr_factor(s) for s in (41, 66, 91, 92)] == [0.5, 0.75, 1.0, 1.0]
    assert mon.lr_factor(40) == 1.0


def test_three_troubled_steps_in_a_row_roll_back():
    mon, l, g = _warm(InstabilityConfig(rollback_after=3))
    actions = [mon.observe(41 + i, l + 5.0, g).action for i in range(3)]
    assert actions == ["lower_lr", "lower_lr", "rollback"]
    mon.restart_history()
    assert mon.observe(44, l + 5.0, g).action is None  # a fresh history judges nothing yet


def test_nonfinite_parameters_roll_back_and_name_the_tensor():
    mon = InstabilityMonitor(InstabilityConfig())
    d = mon.observe(3, 2.0, 1.0, nonfinite="h.1.mlp.c_fc.weight")
    assert (d.signal, d.action, d.worst["tensor"]) == ("nonfinite_param", "rollback", "h.1.mlp.c_fc.weight")


def test_update_ratio_and_logit_limits():
    mon = InstabilityMonitor(InstabilityConfig(max_update_ratio=0.5, max_logit=100.0))
    ok = mon.observe(1, 3.0, 1.0, update_ratio={"wte": 0.01, "attn": 0.4}, max_logit=99.0)
    assert ok.events == []
    d = mon.observe(2, 3.0, 1.0, update_ratio={"wte": 0.01, "attn": 0.7}, max_logit=150.0)
    got = [(e["signal"], e["value"], e.get("tensor")) for e in d.events]
    assert got == [("update_ratio", 0.7, "attn"), ("max_logit", 150.0, None)]
    assert not d.apply_update
    nan = mon.observe(3, 3.0, 1.0, update_ratio={"wte": math.nan, "attn": 0.1})
    assert [(e["signal"], e["tensor"]) for e in nan.events] == [("update_ratio", "wte")]
    off = InstabilityMonitor(InstabilityConfig(max_update_ratio=0, max_logit=0))
    assert off.observe(1, 3.0, 1.0, update_ratio=5.0, max_logit=1e9).events == []


def test_grad_norm_spike_names_the_tensor_given():
    mon, l, g = _warm()
    d = mon.observe(41, l, g * 100, tensor="h.0.attn.c_attn.weight")
    assert (d.signal, d.worst["tensor"]) == ("grad_norm_spike", "h.0.attn.c_attn.weight")


def test_disabled_monitor_says_nothing():
    mon = InstabilityMonitor(InstabilityConfig(enabled=False))
    assert mon.observe(1, math.nan, math.inf, nonfinite=True, max_logit=1e9).events == []


def test_update_ratios_per_group():
    weights = {"wte": np.full((4, 3), 2.0), "h.0.attn.c_attn.weight": np.full((3, 9), 1.0),
               "h.0.attn.c_attn.bias": np.zeros(9), "h.0.ln_1.weight": np.ones(3)}
    updates = {"wte": np.full((4, 3), 0.2), "h.0.attn.c_attn.weight": np.full((3, 9), 0.01),
               "h.0.attn.c_attn.bias": np.full(9, 0.03), "h.0.ln_1.weight": np.zeros(3)}
    got = update_ratios(weights, updates)
    assert got["wte"] == pytest.approx(0.1)
    # attn: sqrt(27 * 0.01^2 + 9 * 0.03^2) / sqrt(27 * 1^2): the zero bias is judged with its weight
    assert got["attn"] == pytest.approx(math.sqrt(27e-4 + 81e-4) / math.sqrt(27))
    assert got["ln"] == 0.0
    assert [tensor_group(n) for n in ("wpe", "h.3.mlp.c_proj.bias", "ln_f.weight", "h.2.ln_2.bias")] == \
        ["wpe", "mlp", "ln", "ln"]
    assert max_abs_logit(np.array([[1.0, -7.5], [3.0, 2.0]])) == 7.5


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="instability.z_treshold: unknown key"):
        InstabilityConfig.from_dict({"z_treshold": 3})
    with pytest.raises(ConfigError, match="instability.spike_action: expected one of"):
        InstabilityConfig.from_dict({"spike_action": "panic"})
    with pytest.raises(ConfigError, match="instability.window: expected int, got True"):
        InstabilityConfig.from_dict({"window": True})
    with pytest.raises(ConfigError, match=r"instability.lr_factor: expected a number in \(0, 1\]"):
        InstabilityConfig.from_dict({"lr_factor": 2})
    with pytest.raises(ConfigError, match="instability.max_logit: expected a number >= 0"):
        InstabilityConfig.from_dict({"max_logit": -1})
    with pytest.raises(ConfigError, match="^my.json: "):
        InstabilityConfig.from_dict({"min_history": 0}, "my.json")
    cfg = InstabilityConfig.from_dict({"z_threshold": 8, "enabled": False})
    assert (cfg.z_threshold, cfg.enabled) == (8.0, False)


@pytest.mark.parametrize("seed", [0, 1])
def test_signals_of_a_report_are_those_of_group_ratios(seed):
    """CUDAEngine._signals (no GPU needed) reads the report's per-tensor sums in the spans' order: the same
    groups, ratios and blamed tensor as instability.group_ratios and largest_tensor on those sums."""
    from types import SimpleNamespace

    from koifish_core.engine.cuda_gpt2 import CUDAEngine
    from koifish_core.train.instability import group_ratios, largest_tensor

    names = ["wte", "wpe", "h.0.ln_1.w", "h.0.attn.c_attn.w", "h.0.attn.c_attn.b", "h.0.mlp.c_fc.w", "h.1.mlp.c_fc.w",
             "h.1.ln_2.b", "ln_f.w"]
    r = np.random.default_rng(seed)
    host = r.random(3 + 3 * len(names)).astype(np.float32)
    fake = SimpleNamespace(spans=[SimpleNamespace(name=n) for n in names], _groups=None)
    got = CUDAEngine._signals(fake, host)
    stats = host[3:].reshape(-1, 3).astype(np.float64)
    want = group_ratios(dict(zip(names, stats[:, 0])), dict(zip(names, stats[:, 1])))
    assert list(got["update_ratio"]) == list(want)
    assert all(math.isclose(got["update_ratio"][g], want[g], rel_tol=1e-12) for g in want)
    assert got["tensor"] == largest_tensor(dict(zip(names, stats[:, 2]))) and got["max_logit"] == float(host[2])
