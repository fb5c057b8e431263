"""Instability signals and recovery on the CUDA engine: the update ratio and largest logit it
reports before an update (no extra sync), a refused update leaves nothing to undo, and every
injected fault is caught at its step and recovered from, as on the CPU."""

import math

import numpy as np
import pytest

from koifish_core.config import load_case
from koifish_core.data.loader import TokenLoader
from koifish_core.train.faults import Fault
from koifish_core.train.instability import group_ratios
from koifish_core.train.metrics import read_metrics
from koifish_core.train.trainer import train

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")]


def _setup(tiny_case, accum=2):
    from koifish_core.engine.cuda_gpt2 import CUDAEngine

    case = load_case(tiny_case(model={"n_embd": 64, "n_head": 4, "n_ctx": 64}, data={"seq_len": 64, "batch_size": 4},
                               optimizer={"grad_accum": accum, "grad_clip": 1.0})).case
    loader = TokenLoader(case.data.train, case.data.batch_size, case.data.seq_len)
    return case, CUDAEngine(case), loader


def test_nonfinite_weights_are_found_after_an_update_and_after_a_poke(tiny_case):
    """Watched (watch_weights), nonfinite_tensor right after an update reads the sum of squares the update
    graph took of the weights it wrote; weights written any other way (poison_params, or a refused
    update after one) get the exact check, which names the tensor."""
    case, gpu, loader = _setup(tiny_case, accum=1)
    gpu.watch_weights(True)  # as the trainer does with instability on, before the first step
    assert gpu.train_step([loader.next_batch()], 1e-3).applied
    assert gpu._params_summed and math.isfinite(float(gpu.params_sq.get()[0]))
    assert gpu.nonfinite_tensor() is None and not gpu._params_summed  # read once
    gpu.poison_params()
    first = next(span.name for span in gpu.spans if span.start == 0)  # poison_params writes params[0]
    assert gpu.nonfinite_tensor() == first
    res = gpu.train_step([loader.next_batch()], 1e-3)  # non-finite loss and gradient: no update
    assert not res.applied and gpu.nonfinite_tensor() == first


def test_gpu_signals_are_those_of_the_update_it_would_apply(tiny_case):
    from koifish_cuda.update_stats import update_stats_ref

    case, gpu, loader = _setup(tiny_case)
    gpu.train_step([loader.next_batch() for _ in range(2)], 1e-2)  # non-zero moments from here on
    batches = [loader.next_batch() for _ in range(2)]
    before = {k: gpu.cp.asnumpy(getattr(gpu, k)) for k in ("params", "m", "v")}
    seen = {}

    def refuse(loss, norm, signals):
        seen.update(signals, loss=loss, norm=norm)
        return False

    res = gpu.train_step(batches, 1e-2, gate=refuse)
    assert not res.applied and gpu.adam_step == 1
    for k, v in before.items():  # the update graph never ran: nothing to undo
        assert np.array_equal(gpu.cp.asnumpy(getattr(gpu, k)), v), k
    # the reference, from the very arrays and hyper-parameters the kernels read
    grads, hyper = gpu.cp.asnumpy(gpu.grads), gpu.cp.asnumpy(gpu.hyper)
    decay, norm_sq = gpu.cp.asnumpy(gpu.decay), float(gpu.cp.asnumpy(gpu.norm_sq)[0])
    b1 = case.optimizer.beta1
    assert hyper[0] == np.float32(1e-2) and hyper[5] == np.float32(1 - b1**2)  # step 2's, set before the norm graph
    upd, w, g = {}, {}, {}
    for span in gpu.spans:
        sl = slice(span.start, span.stop)
        upd[span.name], w[span.name], g[span.name] = update_stats_ref(
            before["params"][sl], grads[sl], before["m"][sl], before["v"][sl], decay[sl], norm_sq, hyper)
    ref = group_ratios(upd, w)
    assert set(seen["update_ratio"]) == set(ref) == {"wte", "wpe", "attn", "mlp", "ln"}
    for group, value in ref.items():
        assert seen["update_ratio"][group] == pytest.approx(value, rel=1e-4), group
    assert seen["tensor"] == max(g, key=g.get)
    assert seen["norm"] == pytest.approx(math.sqrt(sum(g.values())), rel=1e-5)
    # the largest logit of both micro-batches, from the CPU model holding the same weights
    from koifish_core.engine.cpu import CPUEngine

    cpu = CPUEngine(case)
    cpu.load_tensors(gpu.model_tensors(), None, "gpu")
    want = max(float(cpu.model.forward(x)[0].max()) for x, _ in batches)
    assert seen["max_logit"] == pytest.approx(want, rel=1e-2, abs=1e-2)  # TF32 GEMMs
    # accepted, the same step moves the weights by the ratios the gate saw
    accepted = {}
    gpu.train_step(batches, 1e-2, gate=lambda loss, norm, s: accepted.update(s) or True)
    after = gpu.cp.asnumpy(gpu.params)
    moved = {s.name: float(np.sum((after[s.start:s.stop] - before["params"][s.start:s.stop]).astype(np.float64) ** 2))
             for s in gpu.spans}
    real = group_ratios(moved, w)
    for group, value in real.items():
        assert accepted["update_ratio"][group] == pytest.approx(value, rel=1e-3), group
    assert accepted["max_logit"] == pytest.approx(seen["max_logit"], rel=1e-6)  # the maximum restarted


def test_gpu_and_cpu_report_the_same_signals(tiny_case):
    from koifish_core.engine.cpu import CPUEngine

    case, gpu, loader = _setup(tiny_case)
    cpu = CPUEngine(case)
    got = {"cpu": [], "gpu": []}
    for _ in range(5):
        batches = [loader.next_batch() for _ in range(2)]
        for name, engine in (("cpu", cpu), ("gpu", gpu)):
            engine.train_step(batches, 1e-2, gate=lambda loss, norm, s, n=name: got[n].append(s) or True)
    for c, g in zip(got["cpu"], got["gpu"]):
        assert g["update_ratio"] == pytest.approx(c["update_ratio"], rel=5e-2)
        assert g["max_logit"] == pytest.approx(c["max_logit"], rel=2e-2, abs=2e-2)


def _events(run):
    return [r for r in read_metrics(run) if r["kind"] == "event"]


def test_gpu_clean_run_raises_no_alarm(tmp_path, tiny_case):
    case = load_case(tiny_case(train={"steps": 400, "log_every": 100}, eval={"every": 100},
                               checkpoint={"every": 100, "keep_last": 2}))
    train(case, tmp_path / "run", device="cuda")
    assert _events(tmp_path / "run") == []
    rows = read_metrics(tmp_path / "run", kinds=("train",))
    assert len(rows) == 400 and all(0 < r["update_ratio"] < 0.5 and 0 < r["max_logit"] < 100 for r in rows)


@pytest.mark.parametrize("kind, signal, action", [("nan", "nonfinite_grad", "skip"),
                                                  ("spike", "loss_spike", "lower_lr")])
def test_gpu_faults_are_caught_at_their_step(tmp_path, tiny_case, kind, signal, action):
    case = load_case(tiny_case(train={"steps": 40}, checkpoint={"every": 10, "keep_last": 3}, optimizer={"lr": 0.003}))
    res = train(case, tmp_path / "run", device="cuda", inject=[Fault(kind, 25)])
    assert [(e["step"], e["signal"], e["action"]) for e in _events(tmp_path / "run")] == [(25, signal, action)]
    assert res.steps == 40 and math.isfinite(res.final_loss)


def test_gpu_inf_param_rolls_back_bit_for_bit(tmp_path, tiny_case, rollback_spy):
    from koifish_core.train import checkpoint

    restored = rollback_spy
    case = load_case(tiny_case(train={"steps": 40}, checkpoint={"every": 10, "keep_last": 3}, optimizer={"lr": 0.003}))
    res = train(case, tmp_path / "run", device="cuda", inject=[Fault("inf-param", 23)])
    ev = _events(tmp_path / "run")
    assert [(e["step"], e["signal"], e["action"]) for e in ev] == [(23, "nonfinite_param", "rollback"),
                                                                   (23, "rollback", "rolled_back")]
    saved, optim, _ = checkpoint.load(restored["from"])
    assert all(np.array_equal(saved[k], restored["weights"][k]) for k in saved)
    assert all(np.array_equal(optim[k], restored["optim"][k]) for k in ("m", "v", "step"))
    assert res.steps == 40 and math.isfinite(res.final_loss)

