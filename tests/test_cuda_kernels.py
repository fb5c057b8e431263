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


@pytest.mark.parametrize("C", [8, 6])
def test_encoder_forward_backward(C):
    """C = 8: the four-column kernels (vector loads, one vector reduction a row into dwte, dwpe summed
    in registers); C = 6: the element-wise ones. V small: tokens repeat, so rows add into one dwte row."""
    from koifish_cuda.embedding import encoder_backward, encoder_backward_ref, encoder_forward, encoder_forward_ref

    r = rng()
    B, T, V = 3, 5, 11
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


@pytest.mark.parametrize("odd", [False, True])
def test_layernorm_forward_backward(odd):
    """odd: C not a multiple of 4, so the kernels take four scalar loads a group, the last group partly
    past the row's end; else one vector load a group (and the scalar kernel once, vector=False)."""
    from koifish_cuda.layernorm import layernorm_backward, layernorm_backward_ref, layernorm_forward, layernorm_forward_ref

    r = rng()
    N, C = (4096, 768) if ON_GPU else (6, 300)  # 300: several columns a thread, the last ones partly past the row
    C += 2 * odd
    x, w, b = r.standard_normal((N, C)) * 2 + 0.5, r.standard_normal(C), r.standard_normal(C)
    out, mean, rstd = (dev(np.full(s, np.nan, np.float32)) for s in ((N, C), (N,), (N,)))
    f32 = lambda a: dev(a.astype(np.float32))  # noqa: E731
    layernorm_forward(out, mean, rstd, f32(x), f32(w), f32(b))
    ro, rm, rr = layernorm_forward_ref(x, w, b)
    assert rel_err(host(out), ro) < TOL and rel_err(host(mean), rm) < TOL and rel_err(host(rstd), rr) < TOL
    for vector in (True, False):  # C % 4 == 0: four columns a load, or the scalar kernel
        again = dev(np.full((N, C), np.nan, np.float32))
        layernorm_forward(again, mean, rstd, f32(x), f32(w), f32(b), blocks=1, vector=vector)  # one block, every row
        assert rel_err(host(again), ro) < TOL, vector
    dout = r.standard_normal((N, C))
    rdx, rdw, rdb = layernorm_backward_ref(dout, x, w, rm, rr)
    # two rows in flight, the default one, a grid smaller than the rows (the grid-stride turns), and a block of
    # THREADS instead of one fitted to C
    for rows, blocks, fit in ((2, None, True), (1, None, True), (3, 2, True), (1, 2, False)):
        dx, dw, db = dev(np.zeros((N, C), np.float32)), dev(np.zeros(C, np.float32)), dev(np.zeros(C, np.float32))
        dsum0 = r.standard_normal(C)
        dsum = f32(dsum0)
        layernorm_backward(dx, dw, db, f32(dout), f32(x), f32(w), mean, rstd, dsum=dsum, rows=rows, blocks=blocks,
                           fit=fit)
        assert rel_err(host(dx), rdx) < 1e-4 and rel_err(host(dw), rdw) < 1e-4 and rel_err(host(db), rdb) < 1e-4
        # dsum += the new dx's column sums (which nearly cancel: bounded against the terms' size)
        assert np.max(np.abs(host(dsum) - dsum0 - rdx.sum(0))) < 1e-5 * np.abs(rdx).sum(0).max(), rows


def f32(a):
    return dev(np.asarray(a, np.float32))


def test_bias_gelu_and_backward():
    from koifish_cuda.gelu import bias_gelu_forward, gelu_backward, gelu_backward_ref, gelu_forward, gelu_forward_ref

    r = rng()
    N, F = (2048, 3072) if ON_GPU else (3, 20)
    pre, bias, dout = r.standard_normal((N, F)) * 2, r.standard_normal(F), r.standard_normal((N, F))
    out, pre_d = dev(np.full((N, F), np.nan, np.float32)), f32(pre)
    bias_gelu_forward(out, pre_d, f32(bias))
    assert rel_err(host(out), gelu_forward_ref(pre + bias)) < TOL
    again = dev(np.full((N, F), np.nan, np.float32))
    gelu_forward(again, pre_d)  # pre_d now holds pre + bias; gelu alone leaves it as it is
    assert np.array_equal(host(again), host(out)) and rel_err(host(pre_d), pre + bias) < TOL
    dpre = dev(np.full((N, F), np.nan, np.float32))
    gelu_backward(dpre, pre_d, f32(dout))
    assert rel_err(host(dpre), gelu_backward_ref(pre + bias, dout)) < TOL


def test_bias_kernels_and_residual():
    from koifish_cuda.matmul import add_bias, bias_grad
    from koifish_cuda.residual import residual_forward, residual_forward_ref

    r = rng()
    N, C = (4096, 768) if ON_GPU else (37, 9)
    x, b, dout = r.standard_normal((N, C)), r.standard_normal(C), r.standard_normal((N, C))
    xd = f32(x)
    add_bias(xd, f32(b))
    assert rel_err(host(xd), x + b) < TOL
    db = f32(np.zeros(C))
    bias_grad(db, f32(dout), rows_per_block=8)
    assert rel_err(host(db), dout.sum(0)) < 1e-4
    out = dev(np.full((N, C), np.nan, np.float32))
    residual_forward(out, f32(x), f32(dout))
    assert rel_err(host(out), residual_forward_ref(x, dout)) < TOL


def test_attention_kernels_match_reference():
    """Heads split/merge and the causal softmax, with the batched products done in NumPy here
    (the engine does them with cuBLAS)."""
    from koifish_cuda.attention import (attention_backward_ref, attention_forward_ref, merge_heads,
                                        softmax_causal_backward, softmax_causal_forward, split_heads)

    r = rng()
    B, T, nh, hs = (4, 256, 12, 64) if ON_GPU else (2, 5, 2, 3)
    C = nh * hs
    qkv = r.standard_normal((B, T, 3 * C))
    scale = 1.0 / np.sqrt(hs)
    qkv_d = f32(qkv.reshape(B * T, 3 * C))
    q, k, v = (dev(np.full((B * nh, T, hs), np.nan, np.float32)) for _ in range(3))
    for i, dst in enumerate((q, k, v)):
        split_heads(dst, qkv_d, i * C)
    att = dev(np.einsum("btd,bsd->bts", host(q).astype(np.float64), host(k)).astype(np.float32))
    softmax_causal_forward(att, scale)
    y = np.einsum("bts,bsd->btd", host(att).astype(np.float64), host(v))
    out = dev(np.full((B * T, C), np.nan, np.float32))
    merge_heads(out, f32(y), 0)
    ref_out, ref_att = attention_forward_ref(qkv, nh)
    assert rel_err(host(out), ref_out.reshape(B * T, C)) < 1e-4
    assert rel_err(host(att), ref_att.reshape(B * nh, T, T)) < 1e-4
    dout = r.standard_normal((B, T, C))
    dy = dev(np.full((B * nh, T, hs), np.nan, np.float32))
    split_heads(dy, f32(dout.reshape(B * T, C)), 0)
    a64, dy64 = host(att).astype(np.float64), host(dy).astype(np.float64)
    datt = f32(np.einsum("btd,bsd->bts", dy64, host(v)))
    dv = np.einsum("bts,btd->bsd", a64, dy64)
    softmax_causal_backward(datt, att, scale)
    dpre = host(datt).astype(np.float64)
    dq = np.einsum("bts,bsd->btd", dpre, host(k))
    dk = np.einsum("bts,btd->bsd", dpre, host(q))
    dqkv = dev(np.full((B * T, 3 * C), np.nan, np.float32))
    for i, src in enumerate((dq, dk, dv)):
        merge_heads(dqkv, f32(src), i * C)
    ref = attention_backward_ref(dout, qkv, ref_att, nh)
    assert rel_err(host(dqkv), ref.reshape(B * T, 3 * C)) < 1e-4


def test_fused_classifier():
    from koifish_cuda.classifier import fused_classifier, fused_classifier_ref

    r = rng()
    N, V, Vp = (1024, 50257, 50304) if ON_GPU else (4, 50, 64)
    logits = r.standard_normal((N, Vp)) * 3
    targets = r.integers(0, V, N)
    logits[:, V:] = 1e3  # the padding columns hold garbage: it must not count as a logit
    ref_max = np.full(1, -np.inf)
    ref_losses, ref_d = fused_classifier_ref(logits[:, :V], targets, 1.0 / N, max_logit=ref_max)
    assert ref_max[0] == logits[:, :V].max()
    ld, losses, loss_sum = f32(logits), dev(np.full(N, np.nan, np.float32)), f32(np.zeros(1))
    max_logit = f32([-np.inf])
    fused_classifier(ld, losses, loss_sum, dev(targets.astype(np.int32)), V, 1.0 / N, max_logit=max_logit)
    got = host(ld)
    assert rel_err(host(losses), ref_losses) < TOL and abs(host(loss_sum)[0] - ref_losses.mean()) < 1e-4
    assert rel_err(got[:, :V], ref_d) < 1e-4 and np.all(got[:, V:] == 0)
    assert host(max_logit)[0] == np.float32(ref_max[0])  # a maximum is exact: no rounding involved


def test_fused_classifier_max_logit_accumulates_and_old_callers_work():
    from koifish_cuda.classifier import fused_classifier, fused_classifier_ref

    r = rng()
    N, V, Vp = (256, 1000, 1024) if ON_GPU else (3, 20, 32)
    batches = [r.standard_normal((N, Vp)) * s for s in (1.0, 8.0, 2.0)]  # the second holds the maximum
    batches[1][1, 5] = 77.0
    targets = dev(r.integers(0, V, N).astype(np.int32))
    ref_max = np.full(1, -np.inf)
    max_logit = f32([-np.inf])
    for logits in batches:
        fused_classifier_ref(logits[:, :V], host(targets), 1.0 / N, max_logit=ref_max)
        fused_classifier(f32(logits), f32(np.zeros(N)), f32(np.zeros(1)), targets, V, 1.0 / N, max_logit=max_logit)
    assert ref_max[0] == 77.0 and host(max_logit)[0] == 77.0
    # the signature callers used before: no max_logit, same losses and gradients
    ld, loss_sum = f32(batches[0]), f32(np.zeros(1))
    fused_classifier(ld, f32(np.zeros(N)), loss_sum, targets, V, 1.0 / N)
    ref_losses, ref_d = fused_classifier_ref(batches[0][:, :V], host(targets), 1.0 / N)
    assert abs(host(loss_sum)[0] - ref_losses.mean()) < 1e-4 and rel_err(host(ld)[:, :V], ref_d) < 1e-4


def test_adamw_and_norm():
    from koifish_cuda.adamw import adamw_update, adamw_update_ref, global_norm_ref, sum_squares

    r = rng()
    n = 1 << 20 if ON_GPU else 300
    p, g = r.standard_normal(n), r.standard_normal(n)
    m, v = r.standard_normal(n) * 0.1, r.random(n) * 0.1
    mask = r.random(n) < 0.5
    norm_sq = f32(np.zeros(1))
    gd = f32(g)
    sum_squares(norm_sq, gd, vector=False)  # the scalar kernel (unaligned views)
    norm = global_norm_ref(g)
    assert abs(np.sqrt(host(norm_sq)[0]) - norm) < 1e-4 * norm
    # the default 16-byte loads: two whole turns of a one-block grid (2 x 4 x 4 x 128 values) and a ragged tail
    gv = r.standard_normal(n if ON_GPU else 2 * 2048 + 37)
    vec_sq = f32(np.zeros(1))
    sum_squares(vec_sq, f32(gv))
    assert abs(np.sqrt(host(vec_sq)[0]) - global_norm_ref(gv)) < 1e-4 * global_norm_ref(gv)
    clip = norm / 2  # clipping active: the kernel scales the gradient by clip / norm
    step, lr, b1, b2, eps, wd = 3, 1e-2, 0.9, 0.95, 1e-8, 0.1
    hyper = f32([lr, b1, b2, eps, wd, 1 - b1**step, 1 - b2**step, clip])
    from koifish_cuda.bf16 import to_bf16_ref

    runs = []
    for vector in (False, True):  # a weight a thread, or four in 16-byte loads (n a multiple of 4)
        pd, md, vd = f32(p), f32(m), f32(v)
        p16 = dev(np.zeros(n, np.uint16))
        adamw_update(pd, gd, md, vd, dev(mask.astype(np.uint8)), norm_sq, hyper, params16=p16, vector=vector)
        runs.append((pd, md, vd, p16))
    adamw_update_ref(p, g * (clip / (norm + 1e-6)), m, v, mask, step, lr, b1, b2, eps, wd)
    for pd, md, vd, p16 in runs:
        assert rel_err(host(pd), p) < 1e-5 and rel_err(host(md), m) < 1e-5 and rel_err(host(vd), v) < 1e-5
        assert np.array_equal(host(p16), to_bf16_ref(host(pd)))  # the bf16 copy, refreshed in the same pass


def _adam_state(r, n):
    p = r.standard_normal(n) * 0.05
    g = r.standard_normal(n) * np.exp(r.normal(0, 1, n))  # gradients over a few orders of magnitude
    return p, g, r.standard_normal(n) * 0.1, r.random(n) * 0.1, r.random(n) < 0.5


def _stat_launch(chunks, phase=0):
    """stat_chunks' rows and weights, and the phase, as update_stats takes them (device arrays)."""
    rows, weights = chunks
    return dev(rows), dev(weights), dev(np.array([phase], np.int32))


def test_update_stats_sampled_chunks_estimate_the_sums():
    """A large tensor measured on one chunk in S (a different one each phase): each phase's output
    is exactly the weighted sum over its chunks (float32 sums), and the S phases' mean is the whole
    tensor's sums; a small tensor beside it is measured whole in every phase."""
    from koifish_cuda.update_stats import stat_chunks, update_stats, update_stats_ref

    r = rng()
    S, chunk = (4, 4096) if ON_GPU else (2, 16)
    big, small = 8 * S * chunk + chunk // 2, chunk * 3  # the big one ends in a half chunk
    state = [np.concatenate(pair) for pair in zip(_adam_state(r, big), _adam_state(r, small))]
    step, lr, b1, b2, eps, wd = 5, 1e-3, 0.9, 0.95, 1e-8, 0.1
    hyper_h = np.array([lr, b1, b2, eps, wd, 1 - b1**step, 1 - b2**step, 0.0], np.float32)
    norm_sq = np.float32(state[1] @ state[1])
    rows, weights = stat_chunks([(0, 0, big), (1, big, big + small)], chunk, sample=S)
    assert set(rows[rows[:, 0] == 0, 3]) == set(range(S)) and set(rows[rows[:, 0] == 1, 3]) == {-1}
    dev_state = [f32(x) for x in state[:4]] + [dev(state[4].astype(np.uint8))]
    f32_state = [x.astype(np.float32) for x in state]
    exact = [np.array(update_stats_ref(*(x[lo:hi] for x in f32_state), norm_sq, hyper_h)) for lo, hi in
             ((0, big), (big, big + small))]
    def estimate(phase):  # the weighted sums over the phase's chunks, in float64
        return sum(w * np.array(update_stats_ref(*(x[a:b] for x in f32_state), norm_sq, hyper_h))
                   for (i, a, b, ph), w in zip(rows, weights) if i == 0 and ph == phase)

    # the phases partition the tensor: each phase's estimate, unscaled by its weight (the tensor's
    # size over the phase's), adds up to the whole sums (the mean of the estimates is near them only
    # statistically: heavy-tailed g^2 and the last half chunk put it 2% off in 1 draw of 20)
    share = {ph: w for (i, a, b, ph), w in zip(rows, weights) if i == 0}
    assert np.allclose(sum(estimate(phase) / share[phase] for phase in range(S)), exact[0], rtol=1e-9)
    for phase in range(S) if ON_GPU else [1]:  # each phase a launch: the simulator runs one
        out = f32(np.zeros((2, 3)))
        update_stats(out, *_stat_launch((rows, weights), phase), *dev_state, f32([norm_sq]), f32(hyper_h))
        got = host(out).astype(np.float64)
        assert np.allclose(got[0], estimate(phase), rtol=2e-5), phase
        assert np.allclose(got[1], exact[1], rtol=2e-5), phase


def test_update_stats_match_the_update_adamw_applies():
    """The kernel's (sum dp^2, sum p^2, sum g^2) against the float64 reference, and dp is what
    adamw_update then really does to the weights. Bound: float32 sums; worst relative error seen
    2.4e-7 over 15 random draws under the simulator (n <= 700), and 4e-7 in a NumPy emulation of the
    kernel's summation order at n = 2^20 (3 and 132 blocks); 3e-6 leaves a margin of ~8x."""
    from koifish_cuda.adamw import adamw_update, global_norm_ref
    from koifish_cuda.update_stats import stat_chunks, update_stats, update_stats_ref

    r = rng()
    sizes = [1 << 20, 4096, 1, 300] if ON_GPU else [700, 130, 1, 5]
    tensors = [_adam_state(r, n) for n in sizes]
    flat = [np.concatenate([t[k] for t in tensors]) for k in range(5)]
    norm = global_norm_ref(flat[1])
    step, lr, b1, b2, eps, wd = 7, 3e-3, 0.9, 0.95, 1e-8, 0.1
    hyper_h = np.array([lr, b1, b2, eps, wd, 1 - b1**step, 1 - b2**step, norm / 3], np.float32)  # clipping on
    hyper, norm_sq = f32(hyper_h), f32([norm * norm])
    p, g, m, v = (f32(a) for a in flat[:4])
    mask = dev(flat[4].astype(np.uint8))
    out = f32(np.zeros((len(sizes) + 1, 3)))
    starts = np.cumsum([0] + sizes)
    # one launch over every tensor, cut into chunks (small ones under the simulator: several a tensor)
    chunks = _stat_launch(stat_chunks([(i, starts[i], starts[i + 1]) for i in range(len(sizes))],
                                      1 << 16 if ON_GPU else 128))
    update_stats(out, *chunks, p, g, m, v, mask, norm_sq, hyper)
    got = host(out)
    assert np.all(got[-1] == 0)  # rows of other tensors untouched
    lo = 0
    for i, n in enumerate(sizes):
        sl = slice(lo, lo + n)
        ref = update_stats_ref(*(a[sl].astype(np.float32) for a in flat), np.float32(norm * norm), hyper_h)
        assert np.allclose(got[i, 1:], ref[1:], rtol=3e-6, atol=0), (i, got[i], ref)
        # An element whose new moment nearly cancels (b1 m + (1 - b1) g ~ 0) has a float32 step of
        # few correct digits, enough to fail a relative bound alone when a tensor has one element
        # (seen: 3.7e-6, 1 draw in 140): also allow a millionth of a typical step per element.
        assert np.sqrt(got[i, 0]) == pytest.approx(np.sqrt(ref[0]), rel=3e-6, abs=1e-6 * lr * np.sqrt(n)), i
        lo += n
    # nothing was written to the optimizer's arrays, and the update adamw_update then applies is dp
    assert np.array_equal(host(p), flat[0].astype(np.float32)) and np.array_equal(host(m), flat[2].astype(np.float32))
    before = host(p).astype(np.float64)
    adamw_update(p, g, m, v, mask, norm_sq, hyper)
    applied = host(p).astype(np.float64) - before
    lo = 0
    for i, n in enumerate(sizes):
        d = applied[lo:lo + n]
        # the applied change is rounded to the weights' float32 spacing (~4e-9 next to 0.05): at most
        # an ulp per element, which dominates when a one-element tensor's step is tiny
        ulp = float(np.spacing(np.float32(np.abs(before[lo:lo + n]).max() * 2)))
        assert np.sqrt(d @ d) == pytest.approx(np.sqrt(got[i, 0]), rel=1e-4, abs=ulp * np.sqrt(n))
        lo += n


def test_update_stats_clip_off_accumulation_and_nonfinite_norm():
    from koifish_cuda.update_stats import stat_chunks, update_stats, update_stats_ref

    r = rng()
    n = 1 << 16 if ON_GPU else 257
    a, b = _adam_state(r, n), _adam_state(r, n)
    a = (a[0], a[1], np.zeros(n), np.zeros(n), a[4])  # a fresh optimizer for the first slice
    step, lr, b1, b2, eps, wd = 1, 1e-2, 0.9, 0.999, 1e-8, 0.0
    hyper_h = np.array([lr, b1, b2, eps, wd, 1 - b1**step, 1 - b2**step, 0.0], np.float32)  # no clipping
    out = f32(np.zeros((2, 3)))
    both = [np.concatenate([x, y]) for x, y in zip(a, b)]
    chunks = _stat_launch(stat_chunks([(1, 0, n), (1, n, 2 * n)]))  # two ranges into the same row add up
    update_stats(out, *chunks, *(f32(x) for x in both[:4]), dev(both[4].astype(np.uint8)), f32([4.0]), f32(hyper_h))
    ref = np.add(update_stats_ref(*a, np.float32(4.0), hyper_h), update_stats_ref(*b, np.float32(4.0), hyper_h))
    got = host(out)
    # float32 partial sums over 2^16 terms, added in an order the atomics pick: 3e-6 failed once on an H200
    assert np.all(got[0] == 0) and np.allclose(got[1], ref, rtol=2e-5, atol=0)
    # Adam's first step without decay moves every weight by lr * sign(g)
    assert update_stats_ref(*a, np.float32(4.0), hyper_h)[0] == pytest.approx(n * lr * lr, rel=1e-4)  # float32 hyper
    # a non-finite gradient norm: adamw_update skips, so the update is 0; the weights still count
    out = f32(np.zeros((1, 3)))
    update_stats(out, *_stat_launch(stat_chunks([(0, 0, n)])), *(f32(x) for x in a[:4]), dev(a[4].astype(np.uint8)),
                 f32([np.inf]), f32(hyper_h))
    got = host(out)[0]
    assert got[0] == 0 and got[1] == pytest.approx(float(a[0] @ a[0]), rel=3e-6)
    assert update_stats_ref(*a, np.float32(np.nan), hyper_h)[0] == 0.0


def test_zero_spans():
    """Only the listed spans become zero (pieces cut shorter than the spans, and an empty span)."""
    from koifish_cuda.zero_spans import span_pieces, zero_spans, zero_spans_ref

    r = rng()
    x = r.standard_normal(300).astype(np.float32)
    spans = [(0, 5), (17, 17), (40, 131), (299, 300)]
    pieces = span_pieces(spans, piece=32)
    assert (pieces[:, 1] - pieces[:, 0]).max() <= 32 and (pieces[:, 1] - pieces[:, 0]).sum() == 5 + 91 + 1
    ref = x.copy()
    zero_spans_ref(ref, spans)
    got = dev(x)
    zero_spans(got, dev(pieces))
    np.testing.assert_array_equal(host(got), ref)
