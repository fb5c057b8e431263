"""Every Numba kernel against its NumPy reference, in float64 on fresh random inputs.

On a machine without a GPU these run under Numba's CUDA simulator at small shapes (conftest sets
NUMBA_ENABLE_CUDASIM before numba is imported); with a GPU the same checks run on the device
with CuPy arrays, plus larger shapes in the `gpu`-marked tests.
"""

import numpy as np
import pytest

from tests.cuda_harness import ON_GPU, dev, host, rel_err

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")
TOL = 2e-5  # float32 kernels against a float64 reference


def rng():
    return np.random.default_rng()  # fresh inputs every run: the kernel must be right on any input


def test_encoder_forward_backward():
    from koifish_cuda.embedding import encoder_backward, encoder_backward_ref, encoder_forward, encoder_forward_ref

    r = rng()
    B, T, C, V = 2, 5, 8, 11
    wte, wpe = r.standard_normal((V, C)), r.standard_normal((T + 2, C))
    idx = r.integers(0, V, (B, T)).astype(np.int32)
    out = dev(np.full((B * T, C), np.nan, np.float32))
    encoder_forward(out, dev(idx), dev(wte.astype(np.float32)), dev(wpe.astype(np.float32)))
    assert rel_err(host(out), encoder_forward_ref(wte, wpe, idx).reshape(B * T, C)) < TOL
    dout = r.standard_normal((B, T, C))
    ref_wte, ref_wpe = np.zeros_like(wte), np.zeros_like(wpe)
    encoder_backward_ref(ref_wte, ref_wpe, dout, idx)
    gwte, gwpe = dev(np.zeros((V, C), np.float32)), dev(np.zeros((T + 2, C), np.float32))
    encoder_backward(gwte, gwpe, dev(dout.reshape(B * T, C).astype(np.float32)), dev(idx))
    assert rel_err(host(gwte), ref_wte) < TOL and rel_err(host(gwpe), ref_wpe) < TOL


def test_layernorm_forward_backward():
    from koifish_cuda.layernorm import layernorm_backward, layernorm_backward_ref, layernorm_forward, layernorm_forward_ref

    r = rng()
    N, C = (4096, 768) if ON_GPU else (6, 40)
    x, w, b = r.standard_normal((N, C)) * 2 + 0.5, r.standard_normal(C), r.standard_normal(C)
    out, mean, rstd = (dev(np.full(s, np.nan, np.float32)) for s in ((N, C), (N,), (N,)))
    f32 = lambda a: dev(a.astype(np.float32))  # noqa: E731
    layernorm_forward(out, mean, rstd, f32(x), f32(w), f32(b))
    ro, rm, rr = layernorm_forward_ref(x, w, b)
    assert rel_err(host(out), ro) < TOL and rel_err(host(mean), rm) < TOL and rel_err(host(rstd), rr) < TOL
    dout = r.standard_normal((N, C))
    dx, dw, db = dev(np.zeros((N, C), np.float32)), dev(np.zeros(C, np.float32)), dev(np.zeros(C, np.float32))
    layernorm_backward(dx, dw, db, f32(dout), f32(x), f32(w), mean, rstd)
    rdx, rdw, rdb = layernorm_backward_ref(dout, x, w, rm, rr)
    assert rel_err(host(dx), rdx) < 1e-4 and rel_err(host(dw), rdw) < 1e-4 and rel_err(host(db), rdb) < 1e-4
