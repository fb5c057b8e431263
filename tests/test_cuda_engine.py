"""The CUDA engine against the CPU engine on the same case, and checkpoints moving between them."""

import numpy as np
import pytest

from koifish_core.config import load_case
from koifish_core.data.loader import TokenLoader

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")]
# (precision.compute, attention): float32 with TF32 GEMMs; bf16 with cuDNN's flash attention; bf16 with cuBLAS'
PATHS = [("fp32", "auto"), ("bf16", "cudnn"), ("bf16", "cublas")]


def engine(case, attention="auto"):
    from koifish_core.engine.cuda_gpt2 import CUDAEngine
    from koifish_core.errors import KoifishError

    try:
        return CUDAEngine(case, attention=attention)
    except KoifishError as e:
        if attention == "cudnn":
            pytest.skip(str(e))  # cudnn-frontend or cuDNN not installed
        raise


def small_case(tiny_case, compute, accum=2):
    return load_case(tiny_case(model={"n_embd": 64, "n_head": 4, "n_ctx": 64}, data={"seq_len": 64, "batch_size": 4},
                               optimizer={"grad_accum": accum}, precision={"compute": compute})).case


@pytest.mark.parametrize("accum,chunked,variants", [(1, False, {}), (2, False, {}), (3, False, {}), (2, True, {}),
                                                    (2, False, {"classifier": "split"}),
                                                    (2, False, {"bias_grad": "pairs", "adamw": "scalar", "gelu": "kernel"})])
@pytest.mark.parametrize("compute,attention", PATHS)
def test_first_gradients_match_the_cpu(tiny_case, compute, attention, accum, chunked, variants, monkeypatch):
    """Every tensor's gradient of one step (one to three micro-batches: the first writes the weight gradients,
    the others add to them) against the CPU engine's float32;
    chunked: the LM head in two chunks of 128 rows (GPT-2 124M at B=16 runs it in two of 8192); variants:
    the kernels written for measurement in place of the engine's."""
    from koifish_core.engine.cpu import CPUEngine

    if chunked:
        monkeypatch.setattr("koifish_core.config.plan.HEAD_BYTES", 1)  # the fewest rows: one 128-row tile
    case = small_case(tiny_case, compute, accum)
    cpu, gpu = CPUEngine(case), engine(case, attention)
    assert gpu.head_rows == (128 if chunked else 256)
    gpu.variants.update(variants)
    batches = [TokenLoader(case.data.train, 4, 64).next_batch() for _ in range(accum)]
    cpu.model.zero_grad()
    for x, y in batches:
        cpu.model.forward(x, y, return_logits=False)
        cpu.model.backward(grad_scale=1.0 / accum)
    gpu.train_step(batches, 0.0)  # the gradients stay in gpu.g after the step
    # TF32 operands carry 10 mantissa bits, bf16 8: measured 1e-3 and 3e-3..8e-3 on an H200
    bound = 5e-3 if compute == "fp32" else 1.5e-2
    for k, ref in cpu.model.grad_views().items():
        err = np.linalg.norm(gpu.g[k].get() - ref) / np.linalg.norm(ref)
        assert err < bound, (k, err)


@pytest.mark.parametrize("compute,attention", PATHS)
def test_first_50_steps_follow_the_cpu(tiny_case, compute, attention):
    from koifish_core.engine.cpu import CPUEngine

    case = small_case(tiny_case, compute)
    cpu, gpu = CPUEngine(case), engine(case, attention)
    assert gpu.attn.name == ("cublas" if compute == "fp32" else attention)
    loader = TokenLoader(case.data.train, case.data.batch_size, case.data.seq_len)
    cpu_losses, gpu_losses = [], []
    for step in range(50):
        batches = [loader.next_batch() for _ in range(2)]
        # at 1e-3 the curves agree to 4e-4 in bf16 (1e-4 in fp32). At 1e-2 Adam's first steps, which
        # move every weight by about lr whatever its gradient's size, turn bf16's rounding of tiny
        # gradients into loss differences of up to 0.1 (steps 4-9) that close again by step 20.
        lr = 1e-3
        cpu_losses.append(cpu.train_step(batches, lr).loss)
        gpu_losses.append(gpu.train_step(batches, lr).loss)
    assert np.allclose(gpu_losses, cpu_losses, rtol=2e-3, atol=2e-3), list(zip(cpu_losses, gpu_losses))
    assert gpu_losses[-1] < gpu_losses[0] - 2.0


@pytest.mark.parametrize("remat,grad,C", [(0, "fp32", 64), (2, "fp32", 64), (0, "bf16", 64), (2, "bf16", 64),
                                          (0, "bf16", 256), (2, "bf16", 256)])
def test_bf16_residual_stream_follows_the_cpu(tiny_case, remat, grad, C):
    """precision.residual bf16: the blocks' inputs and outputs held as bf16 (remat 2 rebuilds each block
    from its bf16 input); residual_grad bf16: their gradient too (C = 256: through layernorm_bf16's
    warp-per-row kernels). First gradients within twice the bf16 bound of the CPU's, 20 steps' losses
    within 2e-3."""
    from koifish_core.engine.cpu import CPUEngine
    from koifish_cuda import layernorm_bf16

    case = load_case(tiny_case(model={"n_embd": C, "n_head": 4, "n_ctx": 64, "remat": remat},
                               data={"seq_len": 64, "batch_size": 4}, optimizer={"grad_accum": 2},
                               precision={"compute": "bf16", "residual": "bf16", "residual_grad": grad})).case
    cpu, gpu = CPUEngine(case), engine(case)
    assert gpu.x0.dtype == np.uint16 and gpu.act[-1]["res3"].dtype == np.uint16
    assert (gpu.dres.dtype == np.uint16) == (grad == "bf16") and (gpu.dres_g is gpu.dres) == (grad == "bf16")
    assert layernorm_bf16.fits(C, (gpu.x0, gpu.dres), (gpu.p["ln_f.weight"], gpu.g["ln_f.weight"])) == \
        (C == 256 and grad == "bf16")
    loader = TokenLoader(case.data.train, 4, 64)
    batches = [loader.next_batch() for _ in range(2)]
    cpu.model.zero_grad()
    for x, y in batches:
        cpu.model.forward(x, y, return_logits=False)
        cpu.model.backward(grad_scale=0.5)
    refs = {k: g.copy() for k, g in cpu.model.grad_views().items()}
    gpu.train_step(batches, 0.0)
    cpu.train_step(batches, 0.0)  # Adam's moments and step count must match the GPU's for the losses below
    for k, ref in refs.items():
        assert np.linalg.norm(gpu.g[k].get() - ref) / np.linalg.norm(ref) < 3e-2, k
    losses = []
    for _ in range(20):
        batches = [loader.next_batch() for _ in range(2)]
        losses.append((cpu.train_step(batches, 1e-3).loss, gpu.train_step(batches, 1e-3).loss))
    assert np.allclose(*zip(*losses), rtol=2e-3, atol=2e-3), losses  # the bound of test_first_50_steps


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_checkpoints_are_portable(tiny_case, compute):
    from koifish_core.engine.cpu import CPUEngine

    case = load_case(tiny_case(precision={"compute": compute})).case
    gpu = engine(case)
    loader = TokenLoader(case.data.train, case.data.batch_size, case.data.seq_len)
    for _ in range(10):
        gpu.train_step([loader.next_batch()], 1e-2)
    cpu = CPUEngine(case)
    cpu.load_tensors(gpu.model_tensors(), gpu.optim_tensors(), "gpu")
    x, y = loader.next_batch()
    assert abs(cpu.eval_loss(x, y) - gpu.eval_loss(x, y)) < (1e-2 if compute == "fp32" else 3e-2)
    back = engine(case)
    back.load_tensors(cpu.model_tensors(), cpu.optim_tensors(), "cpu")
    for mine, theirs in ((back.model_tensors(), gpu.model_tensors()), (back.optim_tensors(), gpu.optim_tensors())):
        assert all(np.array_equal(mine[k], theirs[k]) for k in theirs)  # the state came back bit for bit
    # the same weights; each engine times its own GEMM algorithms, which may sum a TF32 or bf16
    # product in another order (a run measured the fp32 losses more than 1e-6 apart)
    assert back.eval_loss(x, y) == pytest.approx(gpu.eval_loss(x, y), rel=1e-4)


@pytest.mark.parametrize("remat", [1, 2])
@pytest.mark.parametrize("compute,attention", PATHS)
def test_remat_gives_the_same_steps(tiny_case, remat, compute, attention):
    over = dict(model={"n_layer": 3, "n_embd": 32, "n_head": 2, "n_ctx": 32}, data={"seq_len": 32, "batch_size": 2},
                optimizer={"grad_accum": 2}, precision={"compute": compute})
    base = engine(load_case(tiny_case(**over)).case, attention)
    rebuilt = engine(load_case(tiny_case(**{**over, "model": {**over["model"], "remat": remat}})).case, attention)
    assert rebuilt.act[0]["ln2"] is rebuilt.act[1]["ln2"]  # really shared, not kept per layer
    loader = TokenLoader(base.case.data.train, 2, 32)
    batches = [loader.next_batch() for _ in range(2)]
    a, b = base.train_step(batches, 1e-2), rebuilt.train_step(batches, 1e-2)
    # the same kernels on the same inputs: equal up to summation order (atomics; and each engine
    # times its own GEMM algorithms, so two engines may split a TF32 product differently: wte's
    # gradient measured 4e-4 apart). In bf16 such a difference (or remat 1's GELU, rebuilt by the
    # Numba kernel where the forward had cuBLASLt's epilogue) can round a bf16 operand the other
    # way: 0.15% of h.0's MLP projection gradient off by up to 2e-3 relative
    assert b.loss == pytest.approx(a.loss, rel=1e-5)
    rtol = 1e-2 if compute == "bf16" else 2e-3
    grads_a, grads_b = ({k: v.get() for k, v in e.g.items()} for e in (base, rebuilt))
    for k, g in grads_a.items():
        np.testing.assert_allclose(grads_b[k], g, rtol=rtol, atol=rtol * np.abs(g).max() + 1e-12, err_msg=k)
    for _ in range(4):  # Adam divides by sqrt(v): tiny gradient differences grow, so looser from here
        batches = [loader.next_batch() for _ in range(2)]
        assert rebuilt.train_step(batches, 1e-2).loss == pytest.approx(base.train_step(batches, 1e-2).loss, rel=1e-3)


@pytest.mark.parametrize("gated", [False, True])
def test_a_nonfinite_gradient_moves_nothing(tiny_case, gated):
    """Without a gate the update is queued before the host reads the norm, and the kernel itself must
    leave weights, moments and Adam's clock alone; with one, the host holds it back."""
    case = small_case(tiny_case, "bf16", accum=1)
    gpu = engine(case)
    loader = TokenLoader(case.data.train, 4, 64)
    gpu.train_step([loader.next_batch()], 1e-3)
    before = [a.get() for a in (gpu.params, gpu.params16, gpu.m, gpu.v)]
    gate = (lambda loss, norm, signals: True) if gated else None
    r = gpu.train_step([loader.next_batch()], 1e-3, gate=gate, poison_grads=True)
    assert not r.applied and gpu.adam_step == 1
    for was, now in zip(before, (gpu.params, gpu.params16, gpu.m, gpu.v)):
        np.testing.assert_array_equal(now.get(), was)
    assert gpu.train_step([loader.next_batch()], 1e-3, gate=gate).applied and gpu.adam_step == 2
    assert not np.array_equal(gpu.params.get(), before[0])


def test_sampled_update_statistics_estimate_the_exact_ones(tiny_case):
    """instability.update_sample: the engine measures large tensors on one chunk in S (a different
    one each step), scaled to the tensor; the update ratios it reports stay within a few per cent
    of the exact ones (chunks of 64 elements here, so the tiny model's matrices are sampled)."""
    case = small_case(tiny_case, "bf16", accum=1)
    signals = {}
    for name, sample in (("exact", 1), ("sampled", 4)):
        gpu = engine(case)
        gpu.stat_chunk, gpu.stat_sample = 64, sample
        loader = TokenLoader(case.data.train, case.data.batch_size, case.data.seq_len)
        seen = []
        for _ in range(3):  # three steps: three phases
            gpu.train_step([loader.next_batch()], 1e-3, gate=lambda loss, norm, s: seen.append(s) or True)
        signals[name] = seen
        assert bool((gpu._chunks[1][:, 3] >= 0).any()) == (sample > 1)  # some tensors were sampled
    for exact, sampled in zip(signals["exact"], signals["sampled"]):
        assert exact["update_ratio"].keys() == sampled["update_ratio"].keys()
        for group, ratio in exact["update_ratio"].items():
            assert sampled["update_ratio"][group] == pytest.approx(ratio, rel=0.1), group


def test_staging_queues_uploads_to_one_buffer_in_order():
    """Five uploads to one device buffer through two pinned slots, each read on the stream before the
    next overwrites it: every reader sees its own upload (a slot is reused only once its copy ran)."""
    import cupy as cp

    from koifish_core.engine.staging import Staging

    stream = cp.cuda.Stream(non_blocking=True)
    staging, dst, seen = Staging(stream, slots=2), cp.zeros(1 << 20, cp.int32), []
    with stream:
        for i in range(5):
            staging.upload(dst, np.full(1 << 20, i, np.int64))  # cast to the buffer's int32 on the way
            seen.append(dst.copy())
    stream.synchronize()
    assert [np.unique(s.get()).tolist() for s in seen] == [[i] for i in range(5)]
