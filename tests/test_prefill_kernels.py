"""The bf16 prefill's kernels and GEMM wrapper against NumPy references (GPU when present, else the simulator).

Bounds: conversions and dequantization are exact (the same float32 arithmetic, then the same
round-to-nearest-even); products with bf16 operands 2^-8 relative in norm (each operand rounded
by at most 2^-8 of itself, the errors of a dot product's terms mostly cancelling); attention
through a float16 KV cache and float16 probabilities 3e-3.
"""

import numpy as np
import pytest

from tests.cuda_harness import ON_GPU, dev, host, rel_err

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")
BF16_REL = 2.0**-8


def _blas():
    if not ON_GPU:
        from koifish_cuda.cublas_raw import NumpyBlas

        return NumpyBlas()
    import cupy as cp

    from koifish_cuda.cublas_raw import Cublas

    return Cublas(cp.cuda.get_current_stream(), tf32=False)


def test_bf16_rounding_reference_and_kernel():
    from koifish_cuda.bf16 import from_bf16_ref, to_bf16, to_bf16_ref

    # ties to even: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7 and rounds down to 1; 1 + 3*2^-8 up
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 0.0, -0.0, 3.0e38, 1e-40], np.float32)
    assert list(from_bf16_ref(to_bf16_ref(ties))[:3]) == [1.0, 1 + 2**-6, -1.0]
    x = np.random.default_rng().standard_normal(4096).astype(np.float32) * 100
    back = from_bf16_ref(to_bf16_ref(x))
    assert np.all(np.abs(back - x) <= np.abs(x) * 2.0**-8)  # half a unit of the 8-bit significand
    R, C = (64, 512) if ON_GPU else (3, 40)
    x = np.concatenate([np.random.default_rng().standard_normal(R * C - ties.size).astype(np.float32), ties])
    x = x.reshape(R, C)
    out = dev(np.zeros((R, C), np.uint16))
    to_bf16(out, dev(x))
    assert np.array_equal(host(out), to_bf16_ref(x))


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_dequantize_bf16_bands_equal_the_reference(bits):
    from koifish_cuda.bf16 import to_bf16_ref
    from koifish_cuda.quant import dequantize_bf16, dequantize_groupwise_ref, pack_codes_ref, quantize_groupwise_ref

    rng = np.random.default_rng()
    N, K, G = (1024, 2048, 128) if ON_GPU else (6, 128, 32)
    codes, scales, zeros = quantize_groupwise_ref(rng.standard_normal((N, K)).astype(np.float32), bits, G)
    ref = to_bf16_ref(dequantize_groupwise_ref(codes, scales, zeros, G))  # float32, then rounded
    words, sc, z = dev(pack_codes_ref(codes, bits).view(np.uint32)), dev(scales.astype(np.float32)), dev(zeros)
    n0, k0, n, kc = 2, 32, N - 3, K - 64  # a band of rows and columns, as the prefill's MLP takes them
    out = dev(np.zeros((n, kc), np.uint16))
    dequantize_bf16(out, words, sc, z, bits, G, n0, k0)
    assert np.array_equal(host(out), ref[n0:n0 + n, k0:k0 + kc])
    split, n1 = 2, 3  # two runs of rows in one launch: n0, n0+1, then n1, n1+1, ...
    dequantize_bf16(out, words, sc, z, bits, G, n0, k0, then=(split, n1))
    rows = list(range(n0, n0 + split)) + list(range(n1, n1 + n - split))
    assert np.array_equal(host(out), ref[rows, k0:k0 + kc])


def test_swiglu_bf16():
    from koifish_cuda.bf16 import from_bf16_ref, to_bf16_ref
    from koifish_cuda.swiglu import swiglu_bf16, swiglu_ref

    R, F = (300, 1024) if ON_GPU else (3, 24)
    gu = from_bf16_ref(to_bf16_ref(np.random.default_rng().standard_normal((R, 2 * F)) * 3))
    out = dev(np.zeros((R, F), np.uint16))
    swiglu_bf16(out, dev(to_bf16_ref(gu)))
    ref = swiglu_ref(gu)
    assert np.all(np.abs(from_bf16_ref(host(out)) - ref) <= np.abs(ref) * 2.0**-8 + 1e-6)


@pytest.mark.parametrize("dtype", [np.uint16, np.float16, np.float32])
def test_matmul_on_strided_views(dtype):
    """2-D and 3-D products on views with row strides wider than the rows, against float64."""
    from koifish_cuda.bf16 import from_bf16_ref, to_bf16_ref

    rng = np.random.default_rng()
    M, N, K, nb = (96, 80, 64, 3) if ON_GPU else (5, 4, 6, 2)

    def operand(shape):  # (values as float64, the device array in dtype)
        v = rng.standard_normal(shape)
        if dtype == np.uint16:
            bits = to_bf16_ref(v)
            return from_bf16_ref(bits).astype(np.float64), bits
        return v.astype(dtype).astype(np.float64), v.astype(dtype)

    blas = _blas()
    a, a_d = operand((nb, M, K + 3))  # rows 3 wider than K: the views' leading dimension is K + 3
    b, b_d = operand((nb, N, K))
    out = dev(np.zeros((M, N + 2), np.float32))
    blas.matmul(out[:, :N], dev(a_d)[0, :, :K], dev(b_d)[0])
    tol = 1e-6 if dtype == np.float32 and not ON_GPU else 2e-3 if dtype == np.float32 else 1e-5
    assert rel_err(host(out)[:, :N], a[0, :, :K] @ b[0].T) < tol
    out3 = dev(np.zeros((nb, M, N), np.float32))
    bt, bt_d = operand((nb, K, N))
    blas.matmul(out3, dev(a_d)[:, :, :K], dev(bt_d), trans_b=False, alpha=0.5)
    assert rel_err(host(out3), 0.5 * a[:, :, :K] @ bt) < tol
    blas.matmul(out3, dev(a_d)[:, :, :K], dev(bt_d), trans_b=False, alpha=0.5, beta=1.0)  # accumulates
    assert rel_err(host(out3), a[:, :, :K] @ bt) < tol


@pytest.mark.parametrize("long_rows", [False, pytest.param(True, marks=pytest.mark.gpu)])
def test_causal_softmax(long_rows):
    """Rows as attention_prefill lays them out: period rows per (b, kv head) pair, group heads a token;
    rows longer than the registers hold take the two-pass path."""
    from koifish_cuda.attention_prefill import HELD, causal_softmax, causal_softmax_ref

    rng = np.random.default_rng()
    tq, first, group, pairs = (64, 700, 8, 3) if ON_GPU else (3, 4, 2, 2)
    if long_rows:
        first = HELD * 32 + 100
    L = first + tq
    s = (rng.standard_normal((pairs * tq * group, L)) * 4).astype(np.float32)
    p = dev(np.full(s.shape, np.nan, np.float16))
    causal_softmax(p, dev(s), first, tq * group, group)
    got = host(p).astype(np.float64)
    ref = causal_softmax_ref(s, first, tq * group, group)
    assert np.abs(got - ref).max() < 1e-3 and np.all(got[ref == 0] == 0)


@pytest.mark.parametrize("past,fit,tile", [pytest.param(0, 99, 16, marks=pytest.mark.gpu), (5, 1, 2)])
def test_attention_prefill_equals_the_reference(past, fit, tile):
    """Grouped-query attention of a chunk over an fp16 cache in query tiles (the last one partial),
    the (b, kv head) pairs in groups of `fit` (scratch-bound) or all at once."""
    from koifish_cuda.attention_decode import attention_ref
    from koifish_cuda.attention_prefill import attention_prefill, regroup_ref
    from koifish_cuda.bf16 import from_bf16_ref

    rng = np.random.default_rng()
    B, nh, nkv, hd, T, max_len = (2, 16, 4, 128, 40, 128) if ON_GPU else (2, 4, 2, 16, 3, 12)
    L = past + T
    q = rng.standard_normal((B * T, nh * hd)).astype(np.float32)
    k = np.zeros((B, nkv, max_len, hd), np.float16)
    v = np.zeros_like(k)
    k[:, :, :L] = rng.standard_normal((B, nkv, L, hd)) * 0.3
    v[:, :, :L] = rng.standard_normal((B, nkv, L, hd))
    att = dev(np.zeros((B * T, nh * hd), np.uint16))
    qh = dev(regroup_ref(q, B, nkv, hd).astype(np.float16))
    o = dev(np.zeros((B * nh * T, hd), np.float16))
    per = (nh // nkv) * min(tile, T) * L * 3 // 2  # float32 scores and float16 probabilities of a pair's tile
    scratch = dev(np.zeros(per * min(fit, B * nkv) + 7, np.float32))
    attention_prefill(att, qh, dev(k), dev(v), past, T, _blas(), o, scratch, tile=tile)
    ref = attention_ref(q, k.astype(np.float64), v.astype(np.float64), past, B, nh)
    assert rel_err(from_bf16_ref(host(att)), ref) < 3e-3


def test_int8_cache_to_float16():
    from koifish_cuda.attention_decode import dequantize_kv_ref
    from koifish_cuda.attention_prefill import kv_to_f16

    rng = np.random.default_rng()
    B, nkv, max_len, hd, L = (2, 8, 300, 128, 257) if ON_GPU else (2, 2, 6, 16, 4)
    codes = rng.integers(-127, 128, (B, nkv, max_len, hd)).astype(np.int8)
    scales = rng.random((B, nkv, max_len)).astype(np.float32) * 0.05
    out = dev(np.zeros((B, nkv, max_len, hd), np.float16))
    kv_to_f16(out, dev(codes), dev(scales), L)
    got = host(out).astype(np.float64)
    assert rel_err(got[:, :, :L], dequantize_kv_ref(codes, scales)[:, :, :L]) < 2.0**-11
    assert not got[:, :, L:].any()  # positions from L on are not touched
