"""The 16-byte loads (koifish_cuda.vload) return the elements they cover (simulator in CI, the GPU when there is one)."""

import numpy as np
from numba import cuda

from koifish_cuda.vload import load2, load4
from tests.cuda_harness import dev, host


@cuda.jit
def copy2_kernel(out, a):  # at module level: the simulator swaps a kernel's global `cuda`, not a closure's
    r, i = cuda.blockIdx.x, 2 * cuda.threadIdx.x
    if i < a.shape[1]:
        out[r, i], out[r, i + 1] = load2(a, (r, i))


@cuda.jit
def copy4_kernel(out, a, flat, out_flat):
    r, i = cuda.blockIdx.x, 4 * cuda.threadIdx.x
    if i < a.shape[1]:
        out[r, i], out[r, i + 1], out[r, i + 2], out[r, i + 3] = load4(a, (r, i))
    j = 4 * (cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x)
    if j < flat.shape[0]:
        out_flat[j], out_flat[j + 1], out_flat[j + 2], out_flat[j + 3] = load4(flat, j)


def test_vector_loads_return_the_elements_they_cover():
    r = np.random.default_rng()
    a64 = r.integers(0, 2**63, (3, 16), dtype=np.int64).astype(np.uint64)
    out64 = dev(np.zeros_like(a64))
    copy2_kernel[3, 8](out64, dev(a64))
    assert np.array_equal(host(out64), a64)
    a32 = r.standard_normal((3, 32)).astype(np.float32)
    flat = r.integers(0, 2**32, 96, dtype=np.uint64).astype(np.uint32)
    out32, out_flat = dev(np.zeros_like(a32)), dev(np.zeros_like(flat))
    copy4_kernel[3, 8](out32, dev(a32), dev(flat), out_flat)
    assert np.array_equal(host(out32), a32) and np.array_equal(host(out_flat), flat)


def test_aligned_asks_for_unit_stride_and_aligned_rows():
    from koifish_cuda.vload import aligned

    a = np.zeros((4, 8), np.float32)
    assert aligned(a, 4) and aligned(a[1:], 4)  # rows of 32 bytes
    assert not aligned(a[:, 1:], 4)  # starts one element in
    assert not aligned(a[:, ::2], 2)  # not unit-stride along the last axis
    assert not aligned(np.zeros((4, 6), np.float32), 4)  # rows of 24 bytes: every other row misaligned
    assert aligned(np.zeros((4, 6), np.float32)[:, :4], 2)  # 8-byte vectors fit 24-byte rows
