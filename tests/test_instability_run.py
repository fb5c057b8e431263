"""Instability detection end to end on the CPU engine: a clean run raises no alarm, every injected
fault is caught at its step and recovered from, a rollback restores the checkpoint bit for bit,
the update-ratio and logit limits act, and a refused update leaves the engine untouched."""

import math

import numpy as np
import pytest

from koifish_core.config import load_case
from koifish_core.engine.cpu import CPUEngine
from koifish_core.errors import ConfigError, KoifishError
from koifish_core.train import checkpoint
from koifish_core.train.faults import Fault, parse_inject
from koifish_core.train.instability import InstabilityConfig, update_ratios
from koifish_core.train.metrics import read_metrics
from koifish_core.train.schedule import lr_at
from koifish_core.train.trainer import train


def test_inject_parsing():
    assert parse_inject(["nan@3", "inf-param@10", "spike@7"]) == [Fault("nan", 3), Fault("inf-param", 10),
                                                                  Fault("spike", 7)]
    for bad in ("nan", "boom@3", "nan@x", "nan@0"):
        with pytest.raises(KoifishError, match="--inject"):
            parse_inject([bad])


def _events(run):
    return [r for r in read_metrics(run) if r["kind"] == "event"]


def _case(tiny_case, steps=40, **kw):
    return load_case(tiny_case(train={"steps": steps}, checkpoint={"every": 10, "keep_last": 3},
                               optimizer={"lr": 0.003}, **kw))


def test_clean_run_raises_no_alarm(tmp_path, tiny_case):
    """400 steps at the default thresholds, at the tiny case's own (high) learning rate: no event,
    no skipped step, and every step reports its largest update ratio and logit, well inside the limits."""
    case = load_case(tiny_case(train={"steps": 400, "log_every": 100}, eval={"every": 100},
                               checkpoint={"every": 100, "keep_last": 2}))
    res = train(case, tmp_path / "run")
    assert _events(tmp_path / "run") == []
    rows = read_metrics(tmp_path / "run", kinds=("train",))
    assert len(rows) == 400 and not any(r.get("skipped") for r in rows)
    limits = InstabilityConfig()
    ratios, logits = [r["update_ratio"] for r in rows], [r["max_logit"] for r in rows]
    assert 0 < min(ratios) and max(ratios) < limits.max_update_ratio / 2
    assert 0 < max(logits) < limits.max_logit / 10 and logits[-1] > logits[0]  # logits grow as it learns
    assert res.final_loss < rows[0]["loss"] / 2


@pytest.mark.parametrize("kind, step, signal, action", [
    ("nan", 25, "nonfinite_grad", "skip"),
    ("spike", 25, "loss_spike", "lower_lr"),
])
def test_injected_faults_are_caught_and_survived(tmp_path, tiny_case, kind, step, signal, action):
    case = _case(tiny_case)
    res = train(case, tmp_path / "run", inject=[Fault(kind, step)])
    ev = _events(tmp_path / "run")
    assert [(e["step"], e["signal"], e["action"]) for e in ev] == [(step, signal, action)]
    assert res.steps == 40 and math.isfinite(res.final_loss)
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run", kinds=("train",))}
    assert [s for s, r in rows.items() if r.get("skipped")] == [step]
    scheduled = lambda s: lr_at(s - 1, 40, case.case.optimizer.lr, case.case.schedule)  # noqa: E731
    lowered = [s for s, r in rows.items() if r["lr"] < scheduled(s) * (1 - 1e-9)]
    if action == "lower_lr":  # halved after the spike, ramping back over the 15 steps left
        assert lowered == list(range(step + 1, 41))
        assert rows[step + 1]["lr"] == pytest.approx(scheduled(step + 1) * (0.5 + 0.5 / 50))
    else:
        assert lowered == []


def test_inf_param_rolls_back_to_the_checkpoint_bit_for_bit(tmp_path, tiny_case, rollback_spy):
    restored = rollback_spy
    res = train(_case(tiny_case), tmp_path / "run", inject=[Fault("inf-param", 23)])
    ev = _events(tmp_path / "run")
    assert (ev[0]["step"], ev[0]["signal"], ev[0]["tensor"], ev[0]["action"]) == (23, "nonfinite_param", "wte",
                                                                                 "rollback")
    assert (ev[1]["step"], ev[1]["action"], ev[1]["value"]) == (23, "rolled_back", 20)
    assert len(ev) == 2
    saved, optim, _ = checkpoint.load(restored["from"])
    assert set(saved) == set(restored["weights"])
    assert all(np.array_equal(saved[k], restored["weights"][k]) for k in saved)
    assert all(np.array_equal(optim[k], restored["optim"][k]) for k in ("m", "v", "step"))
    assert res.steps == 40 and math.isfinite(res.final_loss)


def test_repeated_failures_stop_with_a_message(tmp_path, tiny_case):
    case = _case(tiny_case, instability={"max_recoveries": 1})
    faults = [Fault("inf-param", 12), Fault("inf-param", 14)]
    with pytest.raises(KoifishError, match=r"stopped at step 14: signal nonfinite_param, tensor wte"):
        train(case, tmp_path / "run", inject=faults)
    assert read_metrics(tmp_path / "run", kinds=("run",))[-1]["status"] == "failed"


def test_a_logit_limit_acts_then_stops_the_run(tmp_path, tiny_case):
    """A limit the clean run crosses near step 100: each step whose largest logit is above it is
    refused (lower_lr), three in a row roll back, and with no recovery left the run stops."""
    clean = tmp_path / "clean"
    train(load_case(tiny_case(train={"steps": 150}, eval={"every": 0})), clean)
    logits = {r["step"]: r["max_logit"] for r in read_metrics(clean, kinds=("train",))}
    limit = logits[100]
    first = min(s for s, v in logits.items() if v > limit)
    case = load_case(tiny_case(train={"steps": 150}, eval={"every": 0},
                               instability={"max_logit": limit, "max_recoveries": 1}))
    with pytest.raises(KoifishError, match=r"training stopped at step \d+: signal max_logit"):
        train(case, tmp_path / "run")
    ev = _events(tmp_path / "run")
    assert (ev[0]["step"], ev[0]["signal"], ev[0]["action"]) == (first, "max_logit", "lower_lr")
    assert ev[0]["value"] == pytest.approx(logits[first])  # the same run as the clean one up to here
    flagged = [e for e in ev if e["signal"] == "max_logit"]
    assert all(e["value"] > limit for e in flagged)
    rows = read_metrics(tmp_path / "run", kinds=("train",))
    assert [r["step"] for r in rows if r.get("skipped")] == [e["step"] for e in flagged]
    assert all(r["max_logit"] <= limit for r in rows if not r.get("skipped"))
    actions = [e["action"] for e in ev]
    assert actions.count("rolled_back") == 1 and actions[-1] == "rollback"  # the second rollback is the stop
    assert read_metrics(tmp_path / "run", kinds=("run",))[-1]["status"] == "failed"


def test_an_update_ratio_limit_names_the_tensor_group(tmp_path, tiny_case):
    """A limit below what every step does (Adam's first steps move each weight by about lr): no
    update is ever applied, the group to blame is named, and the run stops after its recoveries."""
    case = _case(tiny_case, instability={"max_update_ratio": 1e-3, "max_recoveries": 2})
    with pytest.raises(KoifishError, match=r"stopped at step 9: signal update_ratio, tensor (wte|wpe|attn|mlp|ln) "):
        train(case, tmp_path / "run")
    ev = _events(tmp_path / "run")
    assert [(e["step"], e["action"]) for e in ev if e["signal"] == "update_ratio"] == \
        [(1, "lower_lr"), (2, "lower_lr"), (3, "rollback"), (4, "lower_lr"), (5, "lower_lr"), (6, "rollback"),
         (7, "lower_lr"), (8, "lower_lr"), (9, "rollback")]
    assert all(e["value"] > 1e-3 for e in ev if e["signal"] == "update_ratio")
    assert all(r.get("skipped") for r in read_metrics(tmp_path / "run", kinds=("train",)))


def _tiny_engine(tiny_case, **opt):
    case = load_case(tiny_case(optimizer={"lr": 0.01, "grad_clip": 1.0, **opt})).case
    from koifish_core.data.loader import TokenLoader

    loader = TokenLoader(case.data.train, case.data.batch_size, case.data.seq_len)
    return CPUEngine(case), [loader.next_batch() for _ in range(2)]


def test_a_refused_update_leaves_the_cpu_engine_bit_for_bit(tiny_case):
    engine, batches = _tiny_engine(tiny_case)
    engine.train_step(batches, 0.01)  # moments are non-zero from here on
    before = (engine.model.params.copy(), engine.m.copy(), engine.v.copy(), engine.adam_step)
    seen = {}

    def refuse(loss, norm, signals):
        seen.update(signals, loss=loss, norm=norm)
        return False

    res = engine.train_step(batches, 0.01, gate=refuse)
    assert not res.applied and math.isfinite(res.loss)
    assert np.array_equal(engine.model.params, before[0]) and np.array_equal(engine.m, before[1])
    assert np.array_equal(engine.v, before[2]) and engine.adam_step == before[3]
    assert set(seen["update_ratio"]) == {"wte", "wpe", "attn", "mlp", "ln"}
    assert seen["tensor"] in engine.model.param_views()
    # the same step accepted: the ratios the gate saw are those of the update then applied
    accept = {}
    engine.train_step(batches, 0.01, gate=lambda loss, norm, s: accept.update(s) or True)
    views = engine.model.param_views()
    old = {k: before[0][o:o + v.size].reshape(v.shape) for k, v, o in _offsets(views)}
    assert update_ratios(old, {k: views[k] - old[k] for k in views}) == accept["update_ratio"]
    assert accept["update_ratio"] == pytest.approx(seen["update_ratio"], rel=1e-12)
    assert accept["max_logit"] == seen["max_logit"] > 0


def _offsets(views):
    o = 0
    for k, v in views.items():
        yield k, v, o
        o += v.size


def test_max_logit_is_the_largest_logit_of_every_micro_batch(tiny_case):
    engine, batches = _tiny_engine(tiny_case)
    engine.train_step(batches, 0.01)
    model = engine.model
    want = max(float(model.forward(x)[0].max()) for x, _ in batches)  # the weights step 2 will see
    got = {}
    engine.train_step(batches, 0.01, gate=lambda loss, norm, s: got.update(s) or True)
    assert got["max_logit"] == want


def test_bad_instability_settings_fail_when_the_case_loads(tiny_case):
    with pytest.raises(ConfigError, match=r"instability\.max_update_ratio: expected a number >= 0"):
        load_case(tiny_case(instability={"max_update_ratio": -0.5}))
    with pytest.raises(ConfigError, match=r"instability\.max_logit: expected float, got 'big'"):
        load_case(tiny_case(instability={"max_logit": "big"}))
    with pytest.raises(ConfigError, match=r"instability\.windw: unknown key"):
        load_case(tiny_case(instability={"windw": 5}))
    with pytest.raises(ConfigError, match=r"instability: expected an object"):
        load_case(tiny_case(instability=[1]))
