"""Instability detection on synthetic curves, its settings, and every injected fault end to end."""

import math

import numpy as np
import pytest

from koifish_core.config import load_case
from koifish_core.errors import ConfigError, KoifishError
from koifish_core.train import checkpoint
from koifish_core.train.faults import Fault, parse_inject
from koifish_core.train.instability import InstabilityConfig, InstabilityMonitor
from koifish_core.train.metrics import read_metrics
from koifish_core.train.trainer import train


def _curve(n, seed, spikes=()):
    """A loss falling fast then slowly (as in early training), with noise; grad norms to match."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, n + 1)
    loss = 3.0 + 8.0 * np.exp(-t / 30.0) + 0.6 * np.exp(-t / 400.0) + rng.normal(0, 0.08, n)
    grad = np.exp(rng.normal(0, 0.25, n)) * (0.5 + 2.0 * np.exp(-t / 50.0))
    for s in spikes:
        loss[s - 1] += 4.0
    return loss, grad


def _alarms(loss, grad, cfg=None):
    mon = InstabilityMonitor(cfg or InstabilityConfig())
    out = []
    for step, (l, g) in enumerate(zip(loss, grad), 1):
        d = mon.before_update(step, float(l), float(g))
        out += [(step, e["signal"]) for e in d.events]
    return out


@pytest.mark.parametrize("seed", range(5))
def test_no_false_alarm_while_the_loss_falls_fast(seed):
    loss, grad = _curve(3000, seed)
    assert _alarms(loss, grad) == []


def test_spikes_are_caught_at_their_step():
    loss, grad = _curve(2500, 1, spikes=(25, 200, 2000))
    assert [s for s, sig in _alarms(loss, grad) if sig == "loss_spike"] == [25, 200, 2000]


def test_grad_norm_spike_and_nonfinite_values():
    loss, grad = _curve(300, 2)
    grad[149] *= 50
    loss[199] = math.nan
    grad[249] = math.inf
    assert _alarms(loss, grad) == [(150, "grad_norm_spike"), (200, "nonfinite_loss"), (250, "nonfinite_grad")]


def test_a_gradual_rise_is_not_a_spike():
    loss, grad = _curve(600, 3)
    loss[300:] += np.linspace(0, 1.5, 300)  # slow divergence: a trend, not a spike
    assert [a for a in _alarms(loss, grad) if a[1] == "loss_spike"] == []


def test_outliers_stay_out_of_the_history():
    loss, grad = _curve(400, 4, spikes=range(100, 106))  # six spikes in a row: each one is still caught
    assert [s for s, sig in _alarms(loss, grad) if sig == "loss_spike"] == list(range(100, 106))


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="instability.z_treshold: unknown key"):
        InstabilityConfig.from_dict({"z_treshold": 3})
    with pytest.raises(ConfigError, match="instability.spike_action: expected one of"):
        InstabilityConfig.from_dict({"spike_action": "panic"})
    assert InstabilityConfig.from_dict({"z_threshold": 8}).z_threshold == 8.0


def test_inject_parsing():
    assert parse_inject(["nan@3", "inf-param@10"]) == [Fault("nan", 3), Fault("inf-param", 10)]
    for bad in ("nan", "boom@3", "nan@x", "nan@0"):
        with pytest.raises(KoifishError, match="--inject"):
            parse_inject([bad])


def _events(run):
    return [r for r in read_metrics(run) if r["kind"] == "event"]


def _case(tiny_case, **kw):
    return load_case(tiny_case(train={"steps": 40}, checkpoint={"every": 10, "keep_last": 3},
                               optimizer={"lr": 0.003}, **kw))


def test_clean_run_raises_no_alarm(tmp_path, tiny_case):
    train(_case(tiny_case), tmp_path / "run")
    assert _events(tmp_path / "run") == []


@pytest.mark.parametrize("kind, step, signal, action", [
    ("nan", 25, "nonfinite_grad", "skip"),
    ("spike", 25, "loss_spike", "lower_lr"),
])
def test_injected_faults_are_caught_and_survived(tmp_path, tiny_case, kind, step, signal, action):
    res = train(_case(tiny_case), tmp_path / "run", inject=[Fault(kind, step)])
    ev = _events(tmp_path / "run")
    assert [(e["step"], e["signal"], e["action"]) for e in ev] == [(step, signal, action)]
    assert res.steps == 40 and math.isfinite(res.final_loss)
    skipped = [r["step"] for r in read_metrics(tmp_path / "run", kinds=("train",)) if r.get("skipped")]
    assert skipped == [step]


def test_inf_param_rolls_back_to_the_checkpoint_bit_for_bit(tmp_path, tiny_case, monkeypatch):
    from koifish_core.train import run_hooks

    restored = {}
    original = run_hooks.RunHooks._rollback

    def spy(self, step, event, engine):
        original(self, step, event, engine)
        restored["weights"] = engine.model_tensors()
        restored["from"] = checkpoint.latest(self.run_dir)

    monkeypatch.setattr(run_hooks.RunHooks, "_rollback", spy)
    res = train(_case(tiny_case), tmp_path / "run", inject=[Fault("inf-param", 23)])
    ev = _events(tmp_path / "run")
    assert (ev[0]["step"], ev[0]["signal"], ev[0]["tensor"]) == (23, "nonfinite_param", "wte")
    assert ev[1]["action"] == "rolled_back" and ev[1]["value"] == 20
    saved, _, _ = checkpoint.load(restored["from"])
    assert all(np.array_equal(saved[k], restored["weights"][k]) for k in saved)
    assert res.steps == 40 and math.isfinite(res.final_loss)


def test_repeated_failures_stop_with_a_message(tmp_path, tiny_case):
    case = _case(tiny_case, instability={"max_recoveries": 1})
    faults = [Fault("inf-param", 12), Fault("inf-param", 14)]
    with pytest.raises(KoifishError, match=r"stopped at step 14: signal nonfinite_param, tensor wte"):
        train(case, tmp_path / "run", inject=faults)
    assert read_metrics(tmp_path / "run", kinds=("run",))[-1]["status"] == "failed"
