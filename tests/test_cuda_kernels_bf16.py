"""The training kernels on bf16 operands (uint16 bits), as the engine's precision.compute bf16 runs
them: inputs are bf16 values, the float64 reference is computed from exactly those values, and
bf16 outputs are held to bf16's rounding (relative 2^-8 per element). Under Numba's simulator at
small shapes, on the GPU at GPT-2 shapes; cuBLAS' bf16 GEMMs and cuDNN's attention on the GPU only."""

import numpy as np
import pytest

from tests.cuda_harness import ON_GPU, dev, host, rel_err

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")
BF16 = 2.0 ** -8  # a bf16 value's relative rounding error bound


def rng():
    return np.random.default_rng()


def bf(a):
    """(bf16 bits on the device, the float64 values they hold)."""
    from koifish_cuda.bf16 import from_bf16_ref, to_bf16_ref

    bits = to_bf16_ref(np.asarray(a, np.float32))
    return dev(bits), from_bf16_ref(bits).astype(np.float64)


def val(bits) -> np.ndarray:
    from koifish_cuda.bf16 import from_bf16_ref

    return from_bf16_ref(host(bits)).astype(np.float64)


def f32(a):
    return dev(np.asarray(a, np.float32))


def test_layernorm_writes_bf16_and_its_backward_a_bf16_copy_of_dx():
    from koifish_cuda.layernorm import layernorm_backward, layernorm_backward_ref, layernorm_forward, layernorm_forward_ref

    r = rng()
    N, C = (4096, 768) if ON_GPU else (5, 40)
    x, w, b = r.standard_normal((N, C)) + 0.5, r.standard_normal(C), r.standard_normal(C)
    out, mean, rstd = dev(np.zeros((N, C), np.uint16)), f32(np.zeros(N)), f32(np.zeros(N))
    layernorm_forward(out, mean, rstd, f32(x), f32(w), f32(b))
    ro, rm, rr = layernorm_forward_ref(x.astype(np.float32).astype(np.float64), w.astype(np.float32), b.astype(np.float32))
    assert np.all(np.abs(val(out) - ro) <= BF16 * np.abs(ro) + 1e-5)
    dout, dx0 = r.standard_normal((N, C)), r.standard_normal((N, C))
    dx, dx16 = f32(dx0), dev(np.zeros((N, C), np.uint16))
    dw, db = f32(np.zeros(C)), f32(np.zeros(C))
    layernorm_backward(dx, dw, db, f32(dout), f32(x), f32(w), mean, rstd, dx16=dx16)
    rdx = layernorm_backward_ref(dout, x, w, rm, rr)[0] + dx0
    assert rel_err(host(dx), rdx) < 1e-4
    from koifish_cuda.bf16 import from_bf16_ref, to_bf16_ref
    assert np.array_equal(host(dx16), to_bf16_ref(host(dx))), "the copy is the float32 dx, rounded"
    assert from_bf16_ref(host(dx16)).shape == (N, C)
    # dout in bf16 (a bf16 GEMM's product, as the engine's dln)
    (dout16, dv) = bf(dout)
    dx, dx16 = f32(dx0), dev(np.zeros((N, C), np.uint16))
    layernorm_backward(dx, f32(np.zeros(C)), f32(np.zeros(C)), dout16, f32(x), f32(w), mean, rstd, dx16=dx16)
    assert rel_err(host(dx), layernorm_backward_ref(dv, x, w, rm, rr)[0] + dx0) < 1e-4
    assert np.array_equal(host(dx16), to_bf16_ref(host(dx)))


def test_layernorm_backward_adds_into_a_bf16_dx():
    """precision.residual_grad bf16: the residual's gradient held in bf16, read and written in place by
    the LayerNorm backward (no copy); the sums in float32, the stored value rounded once."""
    from koifish_cuda.layernorm import layernorm_backward, layernorm_backward_ref, layernorm_forward_ref

    r = rng()
    N, C = (4096, 768) if ON_GPU else (5, 40)
    x, w, b = r.standard_normal((N, C)) + 0.5, r.standard_normal(C), r.standard_normal(C)
    _, rm, rr = layernorm_forward_ref(x.astype(np.float32).astype(np.float64), w.astype(np.float32),
                                      b.astype(np.float32))
    (dout16, dv), (dx, dx0) = bf(r.standard_normal((N, C))), bf(r.standard_normal((N, C)))
    layernorm_backward(dx, f32(np.zeros(C)), f32(np.zeros(C)), dout16, f32(x), f32(w), f32(rm), f32(rr))
    ref = layernorm_backward_ref(dv, x, w, rm, rr)[0] + dx0
    assert np.all(np.abs(val(dx) - ref) <= BF16 * np.abs(ref) + 1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("blocks", [None, 1])
def test_layernorm_all_bf16_rows_warp_per_row(blocks):
    """precision.residual and residual_grad bf16: x, out, dout and dx all bf16 at a width of 256 k, which
    layernorm_bf16's warp-per-row kernels take (16-byte loads; one block walking every row, too), against
    the float64 reference on the exact bf16 values; dsum, dw and db to float32 sums' accuracy."""
    from koifish_cuda import layernorm_bf16
    from koifish_cuda.layernorm import layernorm_backward, layernorm_backward_ref, layernorm_forward, layernorm_forward_ref

    r = rng()
    N, C = (4099, 768) if ON_GPU else (13, 256)
    (x, xv), w, b = bf(r.standard_normal((N, C)) + 0.5), r.standard_normal(C), r.standard_normal(C)
    out, mean, rstd = dev(np.zeros((N, C), np.uint16)), f32(np.zeros(N)), f32(np.zeros(N))
    assert layernorm_bf16.fits(C, (out, x), (f32(w), f32(b)))
    layernorm_forward(out, mean, rstd, x, f32(w), f32(b), blocks=blocks)
    ro, rm, rr = layernorm_forward_ref(xv, w.astype(np.float32), b.astype(np.float32))
    assert np.all(np.abs(val(out) - ro) <= BF16 * np.abs(ro) + 1e-4 * np.abs(ro).max())
    assert rel_err(host(mean), rm) < 1e-6 and rel_err(host(rstd), rr) < 1e-5
    (dout, gv), (dx, dx0) = bf(r.standard_normal((N, C))), bf(r.standard_normal((N, C)))
    dw, db, dsum = f32(np.full(C, 1.0)), f32(np.full(C, 2.0)), f32(np.full(C, 3.0))
    assert layernorm_bf16.fits(C, (dx, dout, x), (dw, db, dsum))
    layernorm_backward(dx, dw, db, dout, x, f32(w), mean, rstd, dsum=dsum, blocks=blocks)
    rdx, rdw, rdb = layernorm_backward_ref(gv, xv, w, rm, rr)
    ref = rdx + dx0
    assert np.all(np.abs(val(dx) - ref) <= BF16 * np.abs(ref) + 1e-4 * np.abs(ref).max())
    assert rel_err(host(dw), rdw + 1) < 1e-5 and rel_err(host(db), rdb + 2) < 1e-5
    assert rel_err(host(dsum), ref.sum(axis=0) + 3) < 1e-4  # the sums of the float32 dx, before rounding


@pytest.mark.parametrize("C", [8, 6])
def test_embedding_backward_of_a_bf16_gradient(C):
    """The embedding's backward reads the residual's gradient in bf16 (residual_grad bf16): both kernels
    (four columns a thread at C = 8, one element at C = 6) against the reference on the exact values."""
    from koifish_cuda.embedding import encoder_backward, encoder_backward_ref

    r = rng()
    B, T, V = 3, 5, 11
    idx = r.integers(0, V, (B, T)).astype(np.int32)
    dout16, dv = bf(r.standard_normal((B * T, C)))
    ref_wte, ref_wpe = np.zeros((V, C)), np.zeros((T + 2, C))
    encoder_backward_ref(ref_wte, ref_wpe, dv.reshape(B, T, C), idx)
    gwte, gwpe = f32(np.zeros((V, C))), f32(np.zeros((T + 2, C)))
    encoder_backward(gwte, gwpe, dout16, dev(idx))
    assert rel_err(host(gwte), ref_wte) < 1e-5 and rel_err(host(gwpe), ref_wpe) < 1e-5


def test_residual_stream_in_bf16():
    """The engine's bf16 residual stream: the embedding writes it, LayerNorm's forward and backward
    read it (statistics and dx stay float32)."""
    from koifish_cuda.embedding import encoder_forward, encoder_forward_ref
    from koifish_cuda.layernorm import layernorm_backward, layernorm_backward_ref, layernorm_forward, layernorm_forward_ref

    r = rng()
    B, T, C, V = (8, 1024, 768, 512) if ON_GPU else (2, 3, 40, 11)
    wte, wpe = r.standard_normal((V, C)).astype(np.float32), r.standard_normal((T, C)).astype(np.float32)
    idx = r.integers(0, V, (B, T)).astype(np.int32)
    x = dev(np.zeros((B * T, C), np.uint16))
    encoder_forward(x, dev(idx), f32(wte), f32(wpe))
    ref = encoder_forward_ref(wte, wpe, idx).reshape(B * T, C)
    assert np.all(np.abs(val(x) - ref) <= BF16 * np.abs(ref) + 1e-6)
    xv, w, b = val(x), r.standard_normal(C), r.standard_normal(C)
    out, mean, rstd = f32(np.zeros((B * T, C))), f32(np.zeros(B * T)), f32(np.zeros(B * T))
    layernorm_forward(out, mean, rstd, x, f32(w), f32(b))
    ro, rm, rr = layernorm_forward_ref(xv, w.astype(np.float32), b.astype(np.float32))
    assert rel_err(host(out), ro) < 1e-5  # float32 arithmetic on the exact bf16 values
    dout = r.standard_normal((B * T, C))
    dx, dw, db = f32(np.zeros((B * T, C))), f32(np.zeros(C)), f32(np.zeros(C))
    layernorm_backward(dx, dw, db, f32(dout), x, f32(w), mean, rstd)
    rdx, rdw, rdb = layernorm_backward_ref(dout, xv, w, rm, rr)
    assert rel_err(host(dx), rdx) < 1e-4 and rel_err(host(dw), rdw) < 1e-4 and rel_err(host(db), rdb) < 1e-4


def test_gelu_on_bf16_rows():
    from koifish_cuda.gelu import bias_gelu_forward, gelu_backward, gelu_backward_ref, gelu_forward, gelu_forward_ref

    r = rng()
    N, F = (2048, 3070) if ON_GPU else (3, 20)  # N F / 2 words: not a multiple of four
    (pre, pre_v), bias = bf(r.standard_normal((N, F)) * 2), r.standard_normal(F).astype(np.float32)
    out = dev(np.zeros((N, F), np.uint16))
    bias_gelu_forward(out, pre, f32(bias))
    biased = val(pre)  # the pre-activation as stored (bf16) is what the output and the backward use
    assert np.all(np.abs(biased - (pre_v + bias)) <= BF16 * np.abs(pre_v + bias) + 1e-6)
    ref = gelu_forward_ref(biased)
    assert np.all(np.abs(val(out) - ref) <= BF16 * np.abs(ref) + 1e-5)
    # GELU alone (after a bias-only c_fc GEMM, or remat 1's rebuild): eight values a 16-byte access, the
    # flat words' last (N F / 2 % 4) one at a time; two values a 32-bit word; odd widths the generic kernel
    for width, vector in ((F, True), (F, False), (F - 1, True)):
        again = dev(np.zeros((N, width), np.uint16))
        src = pre if width == F else dev(host(pre)[:, :width].copy())
        gelu_forward(again, src, vector=vector)
        assert np.array_equal(host(again), host(out)[:, :width]), (width, vector)
    dout, dout_v = bf(r.standard_normal((N, F)))
    dpre = dev(np.zeros((N, F), np.uint16))
    gelu_backward(dpre, pre, dout)
    ref = gelu_backward_ref(biased, dout_v)
    assert np.all(np.abs(val(dpre) - ref) <= BF16 * np.abs(ref) + 1e-5)


def test_bias_add_and_bias_grad_on_bf16_rows():
    from koifish_cuda.matmul import add_bias, bias_grad

    r = rng()
    N, C = (4096, 2304) if ON_GPU else (37, 10)
    (x, xv), b = bf(r.standard_normal((N, C))), r.standard_normal(C).astype(np.float32)
    add_bias(x, f32(b))
    assert np.all(np.abs(val(x) - (xv + b)) <= BF16 * np.abs(xv + b) + 1e-6)
    # an even width is read two columns a 32-bit word, an odd one is not; vector: eight columns a 16-byte
    # load (a multiple of 8) in blocks of row groups, slabs of 22 rows: each group a turn of R4 rows in flight
    # and a tail (one group none), the last slab short
    for width, vector in ((C, False), (C + 1, False), (C - C % 8 + 8, True)):
        dout, dv = bf(r.standard_normal((N, width)))
        db = f32(np.ones(width))
        bias_grad(db, dout, rows_per_block=8, vector=vector, group_rows=22)
        assert rel_err(host(db), dv.sum(0) + 1) < 1e-5, vector  # float32 sums of exact bf16 values


def test_heads_split_from_and_merge_into_bf16_rows():
    from koifish_cuda.attention import merge_heads, split_heads
    from koifish_cuda.bf16 import to_bf16_ref

    r = rng()
    B, T, nh, hs = (4, 256, 12, 64) if ON_GPU else (2, 5, 2, 3)
    C = nh * hs
    qkv, v = bf(r.standard_normal((B * T, 3 * C)))
    k = dev(np.zeros((B * nh, T, hs), np.float32))
    split_heads(k, qkv, C)
    want = v[:, C:2 * C].reshape(B, T, nh, hs).transpose(0, 2, 1, 3).reshape(B * nh, T, hs)
    assert np.array_equal(host(k), want.astype(np.float32))  # exact: bf16 values are float32 values
    y = r.standard_normal((B * nh, T, hs)).astype(np.float32)
    rows = dev(np.zeros((B * T, C), np.uint16))
    merge_heads(rows, f32(y), 0)
    assert np.array_equal(host(rows), to_bf16_ref(y.reshape(B, nh, T, hs).transpose(0, 2, 1, 3).reshape(B * T, C)))


@pytest.mark.parametrize("variant", ["registers", "split", "stream"])
@pytest.mark.parametrize("shape", ["gpt2", "narrow", "ragged", "odd"])
def test_fused_classifier_on_bf16_logits(shape, variant, monkeypatch):
    """Even widths run a row kernel (two logits a 32-bit word; the row in registers, or split between
    registers and shared memory: one group of words a thread ("narrow"), several ("gpt2"), the last
    ones partly past the row; words a multiple of 4: a group is a 16-byte load, else ("ragged", 27
    words) four scalar ones); an odd width the generic kernel. "stream" (widths a multiple of 8): the
    rows read twice with a running maximum, blocks walking rows (fewer blocks than rows on the GPU),
    threads whose groups are all padding ("narrow": 32 words)."""
    from koifish_cuda import classifier
    from koifish_cuda.classifier import _bf16_plan, fused_classifier, fused_classifier_ref

    monkeypatch.setattr(classifier, "STREAM_ROWS", 2)  # fewer blocks than rows: each walks several

    r = rng()
    N, V, Vp = {"gpt2": (1024, 50257, 50304) if ON_GPU else (3, 601, 640), "narrow": (4, 50, 64),
                "ragged": (4, 50, 54), "odd": (4, 50, 51)}[shape]
    plan = _bf16_plan(Vp, "registers" if variant == "stream" else variant)  # stream's fallback: registers
    assert (plan is None) == (shape == "odd")
    if variant == "split" and shape == "gpt2":
        assert plan[1] > 0  # part of the row in shared memory
    for threads in (None, 96) if variant == "stream" else (None,):  # 96: a block need not be a power of two
        logits, lv = bf(r.standard_normal((N, Vp)) * 3)
        targets = r.integers(0, V, N)
        targets[0] = V - 1  # the row's last real column (GPT-2's is the odd half of a word)
        ref_losses, ref_d = fused_classifier_ref(lv[:, :V].copy(), targets, 1.0 / N)
        losses, loss_sum, top = f32(np.zeros(N)), f32(np.zeros(1)), f32([-np.inf])
        fused_classifier(logits, losses, loss_sum, dev(targets.astype(np.int32)), V, 1.0 / N, max_logit=top,
                         variant=variant, threads=threads)
        assert rel_err(host(losses), ref_losses) < 1e-5  # the loss is computed in float32 from exact values
        assert abs(host(loss_sum)[0] - ref_losses.mean()) < 1e-5 * ref_losses.mean()
        assert host(top)[0] == lv[:, :V].max()
        got = val(logits)
        assert np.all(np.abs(got[:, :V] - ref_d) <= BF16 * np.abs(ref_d) + 1e-9) and np.all(got[:, V:] == 0)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="cuBLAS needs a GPU")
@pytest.mark.parametrize("trans_a,trans_b,out_bf16,beta", [(False, True, True, 0.0), (False, False, False, 0.0),
                                                           (True, False, False, 1.0)])
def test_cublas_gemm_on_bf16_operands(trans_a, trans_b, out_bf16, beta):
    import cupy as cp

    from koifish_cuda.cublas_raw import Cublas

    r = rng()
    M, N, K = 384, 1280, 768
    (a, av), (b, bv) = bf(r.standard_normal((K, M) if trans_a else (M, K))), bf(r.standard_normal((N, K) if trans_b else (K, N)))
    c0 = r.standard_normal((M, N)).astype(np.float32)
    out = dev(np.zeros((M, N), np.uint16)) if out_bf16 else f32(c0)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        Cublas(stream).gemm(out, a, b, trans_a=trans_a, trans_b=trans_b, beta=beta)
        stream.synchronize()
    ref = (av.T if trans_a else av) @ (bv.T if trans_b else bv) + beta * c0
    got = val(out) if out_bf16 else host(out)
    assert rel_err(got, ref) < (4e-3 if out_bf16 else 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="cuDNN needs a GPU")
def test_cudnn_attention_matches_the_reference():
    """q, k, v read in place from (B, T, 3C) rows; y and dqkv written as rows; bf16 in and out."""
    import cupy as cp

    from koifish_core.errors import KoifishError
    from koifish_cuda.attention import attention_backward_ref, attention_forward_ref

    try:
        from koifish_cuda.cudnn_attention import import_cudnn
        import_cudnn()
    except KoifishError as e:
        pytest.skip(str(e))
    from koifish_cuda.cudnn_attention import CausalAttention

    r = rng()
    B, T, nh, hs = 2, 192, 3, 64
    C = nh * hs
    (qkv, qv), (dy, dyv) = bf(r.standard_normal((B, T, 3 * C))), bf(r.standard_normal((B, T, C)))
    stream = cp.cuda.Stream(non_blocking=True)
    y, dqkv, lse = (dev(np.zeros(s, t)) for s, t in (((B, T, C), np.uint16), ((B, T, 3 * C), np.uint16),
                                                    ((B, nh, T), np.float32)))
    with stream:
        att = CausalAttention(B, T, nh, hs, stream)
        att.forward(y, lse, qkv)
        att.backward(dqkv, dy, qkv, y, lse)
        stream.synchronize()
    ry, p = attention_forward_ref(qv, nh)
    assert rel_err(val(y), ry) < 1e-2
    assert rel_err(val(dqkv), attention_backward_ref(dyv, qv, p, nh)) < 2e-2
    with pytest.raises(ValueError, match="expected C-contiguous"):
        att.forward(y[:, :, :C // 2], lse, qkv)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="cuBLASLt needs a GPU")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_cublaslt_epilogues(dtype):
    """The training engine's fused linear layers: bias, bias + residual, GELU with its pre-activation
    kept, and GELU's derivative, against float64 NumPy on the same (rounded) operands."""
    import cupy as cp

    from koifish_cuda.cublaslt import CublasLt
    from koifish_cuda.gelu import gelu_backward_ref, gelu_forward_ref

    r = rng()
    M, K, N = 512, 256, 1024
    half = dtype == "bf16"

    def operand(shape):
        if half:
            return bf(r.standard_normal(shape))
        x = r.standard_normal(shape).astype(np.float32)
        return f32(x), x.astype(np.float64)

    def empty(shape):
        return dev(np.zeros(shape, np.uint16 if half else np.float32))

    def got(x):
        return val(x) if half else host(x).astype(np.float64)

    tol = 1e-2 if half else 2e-3  # bf16 outputs; TF32 products
    (x, xv), (w, wv), (b, bv) = operand((M, K)), operand((N, K)), operand((N,))
    stream = cp.cuda.Stream(non_blocking=True)
    lt = CublasLt(stream)
    with stream:
        out = empty((M, N))
        lt.matmul(out, x, w, trans_b=True, epilogue="bias", bias=b)
        stream.synchronize()
    pre = xv @ wv.T + bv
    assert rel_err(got(out), pre) < tol
    res0 = r.standard_normal((M, N)).astype(np.float32)
    res, out32 = f32(res0), f32(np.zeros((M, N)))
    bias32 = f32(bv)
    with stream:
        lt.matmul(out32, x, w, trans_b=True, epilogue="bias", bias=bias32, c=res)
        stream.synchronize()
    assert rel_err(host(out32), pre + res0) < 2e-3
    gelu, aux = empty((M, N)), empty((M, N))
    with stream:
        lt.matmul(gelu, x, w, trans_b=True, epilogue="gelu_aux_bias", bias=b, aux=aux)
        stream.synchronize()
    assert rel_err(got(aux), pre) < tol and rel_err(got(gelu), gelu_forward_ref(got(aux))) < tol
    (dout, dv), (w2, w2v) = operand((M, K)), operand((K, N))
    dpre = empty((M, N))
    with stream:
        lt.matmul(dpre, dout, w2, epilogue="dgelu", aux=aux)
        stream.synchronize()
    assert rel_err(got(dpre), gelu_backward_ref(got(aux), dv @ w2v)) < tol
    with pytest.raises(ValueError, match="epilogue"):
        lt.matmul(out, x, w, trans_b=True, epilogue="bias")
