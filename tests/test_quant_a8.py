"""dp4a and the W4A8 batch-1 GEMV against their NumPy references (simulator in CI, the GPU when there is one)."""

import numpy as np
import pytest
from numba import cuda

from koifish_cuda.dp4a import dp4a, dp4a_ref
from koifish_cuda.quant import dequant_matmul_ref, pack_codes_ref, quantize_groupwise_ref
from koifish_cuda.quant_a8 import dequant_matvec4_a8_ref, quantize_x16_ref
from tests.cuda_harness import ON_GPU, dev, host, rel_err

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")


@cuda.jit
def dp4a_kernel(out, a, b, c):  # at module level: the simulator swaps a kernel's global `cuda`, not a closure's
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i < out.size:
        out[i] = dp4a(a[i], b[i], c[i])


def test_dp4a_matches_its_reference():
    r = np.random.default_rng()
    n = 4096 if ON_GPU else 64
    a = r.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    b = r.integers(-2**31, 2**31, n, dtype=np.int64).astype(np.int32)
    c = r.integers(-2**20, 2**20, n).astype(np.int32)  # no overflow: |sum| < 4 * 255 * 128 + 2^20
    a[:4], b[:4] = 0xFFFFFFFF, np.int32(-2**31)  # extreme bytes: 255 and -128, 0
    out = dev(np.zeros(n, np.int32))
    dp4a_kernel[(n + 127) // 128, 128](out, dev(a), dev(b), dev(c))
    assert np.array_equal(host(out), dp4a_ref(a, b, c))


def test_activation_rounding_reference():
    """Each 16-value chunk keeps round-half-even(x * 127 / max|x|): the largest value lands on +-127, an
    all-zero chunk stays zero (scale 0), and x8 * xs is within half a step of x."""
    r = np.random.default_rng()
    x = r.standard_normal(64).astype(np.float32)
    x[16:32] = 0.0
    x8, xs = quantize_x16_ref(x)
    assert x8.dtype == np.int64 and xs.shape == (4,) and xs[1] == 0 and not x8[16:32].any()
    assert np.abs(x8).max() == 127 and np.abs(x8.reshape(4, 16)[[0, 2, 3]]).max(1).tolist() == [127] * 3
    assert np.all(np.abs(x8 * np.repeat(xs, 16) - x) <= np.repeat(xs, 16) * (0.5 + 1e-6))


def test_a8_reference_is_near_the_float_product():
    """The price of rounding x to 8 bits, against the float product with the same 4-bit weights
    (Gaussian x and weights, group 128): relative error ~5e-3 (measured 3.8e-3 to 4.9e-3: the rounding
    step is max|x| / 127 of 16 values), 20x under the 4-bit weights' own (~0.1 against the unquantized
    product)."""
    r = np.random.default_rng()
    N, K, G = 256, 2048, 128
    w = r.standard_normal((N, K)).astype(np.float32)
    codes, scales, zeros = quantize_groupwise_ref(w, 4, G)
    x = r.standard_normal((1, K)).astype(np.float32)
    exact = dequant_matmul_ref(x.astype(np.float64), codes, scales, zeros, G)
    err = rel_err(dequant_matvec4_a8_ref(x, codes, scales, zeros, G), exact)
    assert 1e-3 < err < 1e-2  # above 1e-3: x really is rounded
    assert rel_err(exact, x.astype(np.float64) @ w.T.astype(np.float64)) > 10 * err


def test_rounded_x_times_the_dequantized_matrix_is_the_kernel_reference():
    """round_x16_ref (what quant_quality feeds a float model) @ W_deq.T equals dequant_matvec4_a8_ref, row
    by row."""
    from koifish_cuda.quant import dequantize_groupwise_ref
    from koifish_cuda.quant_a8 import round_x16_ref

    r = np.random.default_rng()
    N, K, G = 24, 256, 64
    codes, scales, zeros = quantize_groupwise_ref(r.standard_normal((N, K)).astype(np.float32), 4, G)
    x = r.standard_normal((3, K)).astype(np.float32)
    got = round_x16_ref(x).astype(np.float64) @ dequantize_groupwise_ref(codes, scales, zeros, G, dtype=np.float64).T
    ref = np.concatenate([dequant_matvec4_a8_ref(x[i:i + 1], codes, scales, zeros, G) for i in range(3)])
    assert rel_err(got, ref) < 1e-6


@pytest.mark.parametrize("rows", [16, 8, None])
@pytest.mark.parametrize("N,K,G", [(4099, 5120, 128), (1024, 25600, 128)] if ON_GPU else [(17, 640, 128), (3, 256, 32)])
def test_a8_kernel_matches_the_reference(N, K, G, rows):
    """Ragged row blocks (N not a multiple of the block's rows), a warp with a partial share of K, a
    zero x chunk (scale 0), overwriting whatever out held; float32 outer sums: ~1e-6 relative."""
    from koifish_cuda.quant_a8 import dequant_matvec4_a8

    r = np.random.default_rng()
    codes, scales, zeros = quantize_groupwise_ref(r.standard_normal((N, K)).astype(np.float32), 4, G)
    x = r.standard_normal((1, K)).astype(np.float32) * np.exp(r.normal(0, 1, (1, K))).astype(np.float32)
    x[0, 32:48] = 0.0
    y = dev(np.full((1, N), np.nan, np.float32))
    dequant_matvec4_a8(y, dev(x), dev(pack_codes_ref(codes, 4).view(np.uint32)), dev(scales.astype(np.float32)),
                       dev(zeros), G, rows=rows)
    assert rel_err(host(y), dequant_matvec4_a8_ref(x, codes, scales, zeros, G)) < 1e-5


def test_quantize_x16_kernel_matches_the_reference():
    """Codes in the kernel's byte order, scales and sums; an all-zero chunk and a chunk of ties."""
    from koifish_cuda.quant_a8 import pack_x16_ref, quantize_x16

    r = np.random.default_rng()
    K = 25600 if ON_GPU else 272
    x = (r.standard_normal((1, K)) * np.exp(r.normal(0, 1, (1, K)))).astype(np.float32)
    x[0, 16:32] = 0.0
    x[0, 48:64] = [127, -127] + [0.5, 1.5, 2.5, -0.5] * 3 + [3.5, -2.5]  # scale 1: exact ties, to even
    x8, xs = quantize_x16_ref(x[0])
    xq, s, sm = dev(np.zeros(K // 4, np.uint32)), dev(np.zeros(K // 16, np.float32)), dev(np.zeros(K // 16, np.int32))
    quantize_x16(dev(x), xq, s, sm)
    assert np.array_equal(host(xq), pack_x16_ref(x8))
    assert np.array_equal(host(s), xs) and np.array_equal(host(sm), x8.reshape(-1, 16).sum(1))


@pytest.mark.parametrize("warps", [4, 5, 2])
@pytest.mark.parametrize("N,K,G", [(4099, 5120, 128)] if ON_GPU else [(17, 640, 128)])
def test_a8_kernel_takes_x_rounded_beforehand(N, K, G, warps):
    """The GEMV on quantize_x16's triple gives the float-x kernel's output to the bit (same arithmetic),
    at any warps a block (a lane's share of K ragged at 5: 320 uint64 a row over 160 lanes at 5120), and
    the reference's within float32 rounding."""
    from koifish_cuda.quant_a8 import dequant_matvec4_a8, quantize_x16

    r = np.random.default_rng()
    codes, scales, zeros = quantize_groupwise_ref(r.standard_normal((N, K)).astype(np.float32), 4, G)
    args = (dev(pack_codes_ref(codes, 4).view(np.uint32)), dev(scales.astype(np.float32)), dev(zeros), G)
    x = dev(r.standard_normal((1, K)).astype(np.float32))
    pre = (dev(np.zeros(K // 4, np.uint32)), dev(np.zeros(K // 16, np.float32)), dev(np.zeros(K // 16, np.int32)))
    quantize_x16(x, *pre)
    y, y_pre = (dev(np.full((1, N), np.nan, np.float32)) for _ in range(2))
    dequant_matvec4_a8(y, x, *args, warps=warps)
    dequant_matvec4_a8(y_pre, pre, *args, warps=warps)
    assert np.array_equal(host(y_pre), host(y))
    assert rel_err(host(y), dequant_matvec4_a8_ref(host(x), codes, scales, zeros, G)) < 1e-5


def test_a8_launcher_refuses_what_it_cannot_run():
    from koifish_cuda.quant_a8 import dequant_matvec4_a8

    y, w, s, z = np.zeros((2, 8), np.float32), np.zeros((8, 4), np.uint32), np.zeros((8, 1), np.float32), np.zeros(
        (8, 1), np.uint8)
    with pytest.raises(ValueError, match="one row of x"):
        dequant_matvec4_a8(y, np.zeros((2, 32), np.float32), w, s, z, 32)
    with pytest.raises(ValueError, match="rows a block must be one of"):
        dequant_matvec4_a8(y[:1], np.zeros((1, 32), np.float32), w, s, z, 32, rows=12)
    with pytest.raises(ValueError, match="C-contiguous"):
        dequant_matvec4_a8(y[:1], np.zeros((1, 32), np.float32), w, np.zeros((8, 2), np.float32)[:, :1], z, 32)
