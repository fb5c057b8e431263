"""The CUDA engine against the CPU engine on the same case, and checkpoints moving between them."""

import numpy as np
import pytest

from koifish_core.config import load_case
from koifish_core.data.loader import TokenLoader

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")]


def test_first_50_steps_follow_the_cpu(tiny_case):
    from koifish_core.engine.cpu import CPUEngine
    from koifish_core.engine.cuda_gpt2 import CUDAEngine

    case = load_case(tiny_case(model={"n_embd": 64, "n_head": 4, "n_ctx": 64}, data={"seq_len": 64, "batch_size": 4},
                               optimizer={"grad_accum": 2})).case
    cpu, gpu = CPUEngine(case), CUDAEngine(case)
    loader = TokenLoader(case.data.train, case.data.batch_size, case.data.seq_len)
    cpu_losses, gpu_losses = [], []
    for step in range(50):
        batches = [loader.next_batch() for _ in range(2)]
        lr = 1e-2
        cpu_losses.append(cpu.train_step(batches, lr).loss)
        gpu_losses.append(gpu.train_step(batches, lr).loss)
    # TF32 GEMMs (10-bit mantissa inputs): bf16-like tolerance on the loss curve
    assert np.allclose(gpu_losses, cpu_losses, rtol=2e-2, atol=2e-2), list(zip(cpu_losses, gpu_losses))
    assert gpu_losses[-1] < gpu_losses[0] - 0.5


def test_checkpoints_are_portable(tiny_case):
    from koifish_core.engine.cpu import CPUEngine
    from koifish_core.engine.cuda_gpt2 import CUDAEngine

    case = load_case(tiny_case()).case
    gpu = CUDAEngine(case)
    loader = TokenLoader(case.data.train, case.data.batch_size, case.data.seq_len)
    for _ in range(10):
        gpu.train_step([loader.next_batch()], 1e-2)
    cpu = CPUEngine(case)
    cpu.load_tensors(gpu.model_tensors(), gpu.optim_tensors(), "gpu")
    x, y = loader.next_batch()
    assert abs(cpu.eval_loss(x, y) - gpu.eval_loss(x, y)) < 1e-2
    back = CUDAEngine(case)
    back.load_tensors(cpu.model_tensors(), cpu.optim_tensors(), "cpu")
    assert back.eval_loss(x, y) == pytest.approx(gpu.eval_loss(x, y), abs=1e-6)


@pytest.mark.parametrize("remat", [1, 2])
def test_remat_gives_the_same_steps(tiny_case, remat):
    from koifish_core.engine.cuda_gpt2 import CUDAEngine

    over = dict(model={"n_layer": 3, "n_embd": 32, "n_head": 2, "n_ctx": 32}, data={"seq_len": 32, "batch_size": 2},
                optimizer={"grad_accum": 2})
    base = CUDAEngine(load_case(tiny_case(**over)).case)
    rebuilt = CUDAEngine(load_case(tiny_case(**{**over, "model": {**over["model"], "remat": remat}})).case)
    assert rebuilt.act[0]["ln2"] is rebuilt.act[1]["ln2"]  # really shared, not kept per layer
    loader = TokenLoader(base.case.data.train, 2, 32)
    batches = [loader.next_batch() for _ in range(2)]
    a, b = base.train_step(batches, 1e-2), rebuilt.train_step(batches, 1e-2)
    # the same kernels on the same inputs: equal up to the atomics' summation order
    assert b.loss == pytest.approx(a.loss, rel=1e-6)
    grads_a, grads_b = ({k: v.get() for k, v in e.g.items()} for e in (base, rebuilt))
    for k, g in grads_a.items():
        np.testing.assert_allclose(grads_b[k], g, rtol=1e-4, atol=1e-5 * np.abs(g).max() + 1e-12, err_msg=k)
    for _ in range(4):  # Adam divides by sqrt(v): tiny gradient differences grow, so looser from here
        batches = [loader.next_batch() for _ in range(2)]
        assert rebuilt.train_step(batches, 1e-2).loss == pytest.approx(base.train_step(batches, 1e-2).loss, rel=1e-3)
