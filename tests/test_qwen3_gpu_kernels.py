"""The Qwen3 decode kernels against their NumPy references in float64 (GPU when present, else the simulator).

Bounds: float32 kernels 2e-5 relative; where values pass through a float16 KV cache, 2e-3 (the
cache's rounding, 2^-11 relative per value).
"""

import numpy as np
import pytest
from numba import cuda, float32

from koifish_cuda.rmsnorm import norm_row_x16
from tests.cuda_harness import ON_GPU, dev, host, rel_err

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")
TOL = 2e-5


@cuda.jit
def norm_row_x16_kernel(out, xq, xs, xsum, x, delta, w):  # at module level: the simulator swaps global `cuda`
    buf = cuda.shared.array(1024, float32)
    wbuf = cuda.shared.array(32, float32)
    norm_row_x16(out, xq, xs, xsum, x, delta, w, float32(1e-6), True, buf, wbuf)


def rng():
    return np.random.default_rng()


def f32(a):
    return dev(np.asarray(a, np.float32))


def test_add_rmsnorm():
    from koifish_cuda.bf16 import to_bf16_ref
    from koifish_cuda.rmsnorm import add_rmsnorm, add_rmsnorm_ref

    r = rng()
    R, C = (8, 5120) if ON_GPU else (3, 200)
    x, d, w = r.standard_normal((R, C)) * 3, r.standard_normal((R, C)), r.standard_normal(C)
    xd, out = f32(x), dev(np.full((R, C), np.nan, np.float32))
    add_rmsnorm(out, xd, f32(d), f32(w), 1e-6)
    rx, ro = add_rmsnorm_ref(x, d, w, 1e-6)
    assert rel_err(host(xd), rx) < TOL and rel_err(host(out), ro) < TOL
    add_rmsnorm(out, xd, None, f32(w), 1e-6)  # no residual: x unchanged
    assert rel_err(host(xd), rx) < TOL and rel_err(host(out), add_rmsnorm_ref(rx, None, w, 1e-6)[1]) < TOL
    ob = dev(np.zeros((R, C), np.uint16))  # bf16 out (the prefill's GEMM operand): the float32 result rounded
    add_rmsnorm(ob, xd, None, f32(w), 1e-6)
    add_rmsnorm(out, xd, None, f32(w), 1e-6)
    assert np.array_equal(host(ob), to_bf16_ref(host(out)))


def _triple(K):
    return dev(np.zeros(K // 4, np.uint32)), dev(np.zeros(K // 16, np.float32)), dev(np.zeros(K // 16, np.int32))


def _weights_ahead():
    """A next GEMV's packed weights for the spare prefetch blocks (koifish_cuda.prefetch): 4 MB on a GPU (up to
    128 spare blocks), 2 lines in the simulator (one block); what they do must not change any output."""
    from koifish_cuda.prefetch import weight_lines

    words = dev(np.arange((1 << 20) if ON_GPU else 64, dtype=np.uint32).reshape(-1, 8))
    return weight_lines(words, 4 << 20)


def _assert_rounds(xq, values):
    """xq holds `values` (1, K) rounded as quant_a8.quantize_x16 rounds them."""
    from koifish_cuda.quant_a8 import pack_x16_ref, quantize_x16_ref

    x8, xs = quantize_x16_ref(values[0])
    assert np.array_equal(host(xq[0]), pack_x16_ref(x8)) and np.array_equal(host(xq[1]), xs)
    assert np.array_equal(host(xq[2]), x8.reshape(-1, 16).sum(1))


@pytest.mark.parametrize("residual", [True, False])
def test_add_rmsnorm_x16_rounds_what_it_writes(residual):
    """The decode step's norm with its GEMV's rounding fused: out and x as add_rmsnorm's reference,
    the triple exactly the rounding of out."""
    from koifish_cuda.rmsnorm import add_rmsnorm_ref, add_rmsnorm_x16

    r = rng()
    C = 5120 if ON_GPU else 1120  # 320 chunks (ten warps), 70 (three warps, the last with idle lanes)
    x, d, w = r.standard_normal((1, C)) * 3, r.standard_normal((1, C)), r.standard_normal(C)
    xd, out, xq = f32(x), dev(np.full((1, C), np.nan, np.float32)), _triple(C)
    add_rmsnorm_x16(out, xq, xd, f32(d) if residual else None, f32(w), 1e-6,
                    prefetch=None if residual else _weights_ahead())
    rx, ro = add_rmsnorm_ref(x, d if residual else None, w, 1e-6)
    assert rel_err(host(xd), rx) < TOL and rel_err(host(out), ro) < TOL
    _assert_rounds(xq, host(out))


def test_norm_row_x16_with_more_chunks_than_threads():
    """add_rmsnorm_x16's block norm in a block narrower than its chunks (chunks block-strided: a thread's
    last chunk kept in registers, the others loaded again): as add_rmsnorm's reference, rounded as written."""
    from koifish_cuda.rmsnorm import add_rmsnorm_ref

    r = rng()
    C = 5120 if ON_GPU else 1120  # 320 chunks over 96 threads; 70 over 32
    x, d, w = r.standard_normal((1, C)) * 3, r.standard_normal((1, C)), r.standard_normal(C)
    xd, out, xq = f32(x), dev(np.full((1, C), np.nan, np.float32)), _triple(C)
    norm_row_x16_kernel[1, 96 if ON_GPU else 32](out, *xq, xd, f32(d), f32(w))
    rx, ro = add_rmsnorm_ref(x, d, w, 1e-6)
    assert rel_err(host(xd), rx) < TOL and rel_err(host(out), ro) < TOL
    _assert_rounds(xq, host(out))


def test_swiglu_x16_rounds_what_it_writes():
    from koifish_cuda.swiglu import swiglu_ref, swiglu_x16

    r = rng()
    F = 25600 if ON_GPU else 48
    gu = r.standard_normal((1, 2 * F)) * 2
    out, xq = dev(np.full((1, F), np.nan, np.float32)), _triple(F)
    swiglu_x16(out, xq, f32(gu), prefetch=_weights_ahead())  # spare blocks past the chunks' blocks
    assert rel_err(host(out), swiglu_ref(gu)) < TOL
    _assert_rounds(xq, host(out))


@pytest.mark.parametrize("cache_dtype,regroup", [
    (np.float32, False), pytest.param(np.float16, False, marks=pytest.mark.gpu), (np.float16, True)])
def test_qk_norm_rope_writes_q_and_the_cache(cache_dtype, regroup):
    """q token-major in float32 (decode), or regrouped by (b, kv head) in the cache's dtype (prefill).
    head_dim 128 and 64 take RoPE's partner from the lane's own registers, 16 and 48 through shared memory."""
    from koifish_cuda.attention_prefill import regroup_ref
    from koifish_cuda.rope import qk_norm_rope, qk_norm_rope_ref, rope_tables

    r = rng()
    B, T, nh, nkv, hd, past, max_len = (2, 3, 64, 8, 128, 1000, 1100) if ON_GPU else (2, 3, 4, 2, 16, 5, 12)
    if cache_dtype == np.float32 and ON_GPU:
        hd = 48
    if regroup and not ON_GPU:
        hd = 64
    qkv = r.standard_normal((B * T, (nh + 2 * nkv) * hd)) * 2
    qn, kn = 1 + 0.2 * r.standard_normal(hd), 1 + 0.2 * r.standard_normal(hd)
    cos, sin = rope_tables(max_len, hd, 1e6)
    q = dev(np.full((B * nh * T, hd) if regroup else (B * T, nh * hd), np.nan, cache_dtype if regroup else np.float32))
    kc, vc = (dev(np.zeros((B, nkv, max_len, hd), cache_dtype)) for _ in range(2))
    qk_norm_rope(q, kc, vc, f32(qkv), f32(qn), f32(kn), dev(cos), dev(sin), dev(np.array([past], np.int32)), T, nh,
                 1e-6, regroup=regroup)
    rq, rk, rv = qk_norm_rope_ref(qkv, qn, kn, cos, sin, past, B, nh, nkv, hd, 1e-6)
    tol = TOL if cache_dtype == np.float32 else 1e-3
    assert rel_err(host(q), regroup_ref(rq, B, nkv, hd) if regroup else rq) < (tol if regroup else TOL)
    assert rel_err(host(kc)[:, :, past:past + T], rk) < tol and rel_err(host(vc)[:, :, past:past + T], rv) < tol
    assert not host(kc)[:, :, :past].any() and not host(kc)[:, :, past + T:].any()  # nothing else written


@pytest.mark.parametrize("T,splits", [(1, 4), (3, 2), (1, 1)])
def test_attention_decode_gqa(T, splits):
    """The tile split kernel (int8 caches and head dims not a multiple of 32 take it) on a float16 cache."""
    from koifish_cuda.attention_decode import attention_decode, attention_ref, attention_scratch

    r = rng()
    if ON_GPU:
        B, nh, nkv, hd, past, max_len = 4, 64, 8, 128, 700, 1024
    else:
        B, nh, nkv, hd, past, max_len = 2, 4, 2, 16, 70, 80  # past > 2 TILE: several tiles in a split
    q = r.standard_normal((B * T, nh * hd))
    k, v = r.standard_normal((B, nkv, max_len, hd)) * 0.5, r.standard_normal((B, nkv, max_len, hd))
    k16, v16 = k.astype(np.float16), v.astype(np.float16)
    out = dev(np.full((B * T, nh * hd), np.nan, np.float32))
    scratch = attention_scratch(np if not ON_GPU else __import__("cupy"), B * T, nh, hd, splits)
    attention_decode(out, f32(q), dev(k16), dev(v16), dev(np.array([past], np.int32)), T, scratch, variant="tiles")
    ref = attention_ref(q, k16, v16, past, B, nh)  # the same rounded cache: only the kernel's arithmetic differs
    assert rel_err(host(out), ref) < 1e-4


@pytest.mark.parametrize("hd,cache_dtype,T,splits", [(128, np.float16, 1, 3), (32, np.float32, 2, 2), (64, np.float16, 1, 1)])
def test_attention_decode_warps_variant(hd, cache_dtype, T, splits):
    """The "warps" split kernel, the default (a warp walks its own keys, a lane owns head_dim/32 dimensions: one
    vector load a row at 128 in float16) against the reference; some warps see no key of a split
    (past + 1 keys over splits x 4 warps), the kernel merges them."""
    from koifish_cuda.attention_decode import attention_decode, attention_ref, attention_scratch

    r = rng()
    B, nh, nkv, past, max_len = (2, 64, 8, 700, 1024) if ON_GPU else (1, 4, 2, 9, 16)
    q = r.standard_normal((B * T, nh * hd))
    k, v = r.standard_normal((B, nkv, max_len, hd)) * 0.5, r.standard_normal((B, nkv, max_len, hd))
    kc, vc = k.astype(cache_dtype), v.astype(cache_dtype)
    out = dev(np.full((B * T, nh * hd), np.nan, np.float32))
    scratch = attention_scratch(np if not ON_GPU else __import__("cupy"), B * T, nh, hd, splits)
    attention_decode(out, f32(q), dev(kc), dev(vc), dev(np.array([past], np.int32)), T, scratch, variant="warps")
    assert rel_err(host(out), attention_ref(q, kc, vc, past, B, nh)) < 1e-4


# the simulator's mma and shuffles cost a barrier each (~20 s a case): two cases there, three on a GPU
@pytest.mark.parametrize("nh,nkv,T,past,splits", [(8, 1, 1, 40, 2), (6, 2, 2, 3, 1)] + ([(4, 1, 1, 5, 4)] if ON_GPU else []))
def test_attention_decode_mma_variant(nh, nkv, T, past, splits):
    """The tensor-core split kernel against the float64 reference: 8 and fewer query heads a kv head
    (the product's rows past them zero), a tile with dead keys, splits past the cache's keys. Its query
    goes in as two float16 parts, so it keeps float32's precision (the same bound as the warps kernel)."""
    from koifish_cuda.attention_decode import attention_decode, attention_ref, attention_scratch

    r = rng()
    hd, B = 64, 1
    if ON_GPU:
        nh, nkv, hd, B, past = nh * 8, nkv * 8, 128, 2, past * 50
    max_len = past + T + 3
    q = r.standard_normal((B * T, nh * hd)) * 2
    k, v = (r.standard_normal((B, nkv, max_len, hd)).astype(np.float16) for _ in range(2))
    out = dev(np.full((B * T, nh * hd), np.nan, np.float32))
    scratch = attention_scratch(np if not ON_GPU else __import__("cupy"), B * T, nh, hd, splits)
    attention_decode(out, f32(q), dev(k), dev(v), dev(np.array([past], np.int32)), T, scratch, variant="mma",
                     prefetch=_weights_ahead())  # a spare row of split blocks
    assert rel_err(host(out), attention_ref(q, k, v, past, B, nh)) < 1e-4


@pytest.mark.parametrize("nh,nkv,B,past,splits", [(4, 2, 2, 5, 3)] + ([(8, 1, 1, 70, 2)] if ON_GPU else []))
def test_attention_decode_mma_with_the_q_k_norm_and_rope_fused(nh, nkv, B, past, splits):
    """rope=(qn, kn, cos, sin, eps): the kernel takes the fused projection's rows, norms and rotates the
    query heads and stores the new key and value at pos as qk_norm_rope would; output and cache against
    the float64 references (the cache row to float16's rounding)."""
    from koifish_cuda.attention_decode import attention_decode, attention_ref, attention_scratch, fuses_rope
    from koifish_cuda.rope import qk_norm_rope_ref, rope_tables

    r = rng()
    hd = 64
    if ON_GPU:
        nh, nkv, hd, past = nh * 8, nkv * 8, 128, past * 30
    max_len, eps = past + 4, 1e-6
    qkv = r.standard_normal((B, (nh + 2 * nkv) * hd)) * 3
    qn, kn = 1 + 0.3 * r.standard_normal(hd), 1 + 0.3 * r.standard_normal(hd)
    cos, sin = rope_tables(max_len, hd, 1e6)
    kc, vc = (r.standard_normal((B, nkv, max_len, hd)).astype(np.float16) for _ in range(2))
    kd, vd, qd = dev(kc), dev(vc), f32(qkv)
    assert fuses_rope("mma", qd, kd, vd, nh, 1)
    out = dev(np.full((B, nh * hd), np.nan, np.float32))
    scratch = attention_scratch(np if not ON_GPU else __import__("cupy"), B, nh, hd, splits)
    attention_decode(out, qd, kd, vd, dev(np.array([past], np.int32)), 1, scratch, variant="mma",
                     rope=(f32(qn), f32(kn), dev(cos), dev(sin), eps))
    q, k, v = qk_norm_rope_ref(qkv.astype(np.float32), qn.astype(np.float32), kn.astype(np.float32), cos, sin, past, B,
                               nh, nkv, hd, eps)
    kc[:, :, past], vc[:, :, past] = k[:, :, 0], v[:, :, 0]
    assert rel_err(host(kd)[:, :, past], k[:, :, 0]) < 1e-3 and np.array_equal(host(vd)[:, :, past], vc[:, :, past])
    assert rel_err(host(out), attention_ref(q, kc, vc, past, B, nh)) < 1e-4


@pytest.mark.parametrize("variant", ["warps", "tiles"])
def test_attention_decode_rounds_its_row_for_the_o_projection(variant):
    """One decode row with xq: the merge also writes its output rounded as quantize_x16 rounds it."""
    from koifish_cuda.attention_decode import attention_decode, attention_ref, attention_scratch

    r = rng()
    B, nh, nkv, hd, past, max_len = (1, 64, 8, 128, 700, 1024) if ON_GPU else (1, 4, 2, 32, 9, 16)
    q = r.standard_normal((1, nh * hd))
    k, v = (r.standard_normal((B, nkv, max_len, hd)).astype(np.float16) for _ in range(2))
    out, xq = dev(np.full((1, nh * hd), np.nan, np.float32)), _triple(nh * hd)
    scratch = attention_scratch(np if not ON_GPU else __import__("cupy"), 1, nh, hd, 2)
    attention_decode(out, f32(q), dev(k), dev(v), dev(np.array([past], np.int32)), 1, scratch, variant=variant, xq=xq,
                     prefetch=_weights_ahead())  # the merge's spare blocks
    assert rel_err(host(out), attention_ref(q, k, v, past, B, nh)) < 1e-4
    _assert_rounds(xq, host(out))


def test_attention_decode_warps_with_a_split_past_a_full_cache():
    """5 keys in a cache of 5 over 4 splits of 2: the last split starts at key 6, past the cache; the
    warp kernel loads no key outside it (the simulator checks every index) and leaves that split empty."""
    from koifish_cuda.attention_decode import attention_decode, attention_ref, attention_scratch

    r = rng()
    B, nh, nkv, hd, past = 1, 4, 2, 32, 4
    q, k, v = r.standard_normal((1, nh * hd)), r.standard_normal((B, nkv, past + 1, hd)), r.standard_normal(
        (B, nkv, past + 1, hd))
    out = dev(np.full((1, nh * hd), np.nan, np.float32))
    scratch = attention_scratch(np if not ON_GPU else __import__("cupy"), 1, nh, hd, 4)
    attention_decode(out, f32(q), f32(k), f32(v), dev(np.array([past], np.int32)), 1, scratch, variant="warps")
    assert rel_err(host(out), attention_ref(q, k.astype(np.float32), v.astype(np.float32), past, B, nh)) < 1e-5


def test_swiglu_and_embedding_rows():
    from koifish_core.infer.quant import quantize_weight
    from koifish_cuda.embedding_rows import embed_rows, embed_rows_ref
    from koifish_cuda.swiglu import swiglu, swiglu_ref

    r = rng()
    R, F = (8, 25600) if ON_GPU else (3, 40)
    gu = r.standard_normal((R, 2 * F)) * 3
    out = dev(np.full((R, F), np.nan, np.float32))
    swiglu(out, f32(gu))
    assert rel_err(host(out), swiglu_ref(gu)) < TOL
    V, C = (1000, 512) if ON_GPU else (30, 64)
    table = r.standard_normal((V, C))
    ids = np.array([3, 0, V - 1, 3], np.int32)
    e = dev(np.full((4, C), np.nan, np.float32))
    embed_rows(e, dev(ids), table=f32(table))
    assert rel_err(host(e), embed_rows_ref(table, ids)) < TOL
    for bits in (4, 8):
        qw = quantize_weight(table.astype(np.float32), bits, 32)
        quant = (dev(qw.packed.view(np.uint32)), f32(qw.scales), dev(qw.zeros), bits, qw.group_size)
        embed_rows(e, dev(ids), quant=quant)
        assert rel_err(host(e), embed_rows_ref(qw.dequantize(np.float64), ids)) < 1e-6


def _run_sample(logits, p, seen=None, counter=0, emit=True):
    from koifish_cuda.sampling import params_array, sample, sample_scratch

    B, V = logits.shape
    tokens = dev(np.full(B, -1, np.int32))
    seen_d = dev(np.zeros((B, V), np.uint8) if seen is None else seen.astype(np.uint8))
    zbuf = dev(np.zeros((B, V), np.float32))
    # the simulator's rows are short: blocks of 128 logits, so the passes still merge several blocks
    scratch = sample_scratch(__import__("cupy") if ON_GPU else np, B, V, *(() if ON_GPU else (128,)))
    sample(tokens, seen_d, zbuf, f32(logits), dev(params_array(p)), dev(np.array([p.seed or 0, counter], np.int64)),
           scratch, emit)
    return host(tokens), host(zbuf), host(seen_d)


SAMPLING_CASES = [dict(temperature=0.0, repetition_penalty=1.3), dict(temperature=1.3, min_p=0.1),
                  dict(temperature=0.6, top_k=20, top_p=0.95, min_p=0.05, repetition_penalty=1.2),
                  dict(temperature=0.0), dict(temperature=0.7, top_k=5), dict(temperature=1.0, top_p=0.8),
                  dict(temperature=0.9, top_k=7, top_p=0.5)]


# Under the simulator (one Python thread per GPU thread, ~15 s a case) three cases cover every pass:
# greedy with the penalty, every filter at once, and top-p alone over the whole vocabulary.
@pytest.mark.parametrize("kw", SAMPLING_CASES if ON_GPU else [SAMPLING_CASES[i] for i in (0, 2, 5)])
def test_sampling_kernel_matches_the_reference_filters(kw):
    from koifish_core.infer.sampling import SamplingParams
    from koifish_cuda.sampling import sample_probs_ref

    r = rng()
    B, V = (3, 151936) if ON_GPU else (1, 300)  # the seeded test below runs several rows under the simulator
    logits = r.standard_normal((B, V)) * 3
    logits[0, 7] = logits[0, 11] = logits[0].max() + 1  # a tie at the top: argmax takes the lower index
    p = SamplingParams(seed=5, **kw)
    seen = np.zeros((B, V), bool)
    prev = [list(r.integers(0, V, 30)) for _ in range(B)]
    prev[0] = [i for i in prev[0] if i not in (7, 11)]  # a penalty on one of the tied pair would break the tie
    for b in range(B):
        seen[b, prev[b]] = True
    tokens, probs, seen_after = _run_sample(logits.astype(np.float32), p, seen)
    for b in range(B):
        ref = sample_probs_ref(logits[b].astype(np.float32), p, prev[b])
        assert ref[tokens[b]] > 0, "drew a token the reference filters out"
        assert seen_after[b, tokens[b]] == 1
        if p.temperature > 0:
            assert np.array_equal(probs[b] > 0, ref > 0), "kept set differs from the reference"
            assert np.abs(probs[b] - ref).max() < 1e-5
        else:
            assert tokens[b] == np.argmax(ref)
    if p.temperature == 0:
        assert tokens[0] == 7


def test_sampling_is_seeded_and_follows_the_distribution():
    from koifish_core.infer.sampling import SamplingParams
    from koifish_cuda.sampling import sample_probs_ref

    V = 12
    B = 64 if ON_GPU else 2  # the simulator runs each GPU thread as a Python thread: keep it small
    base = np.random.default_rng(3).standard_normal(V)
    logits = np.tile(base, (B, 1)).astype(np.float32)
    p = SamplingParams(temperature=1.0, top_k=6, seed=11)
    a, _, _ = _run_sample(logits, p, counter=4, emit=False)
    b, _, _ = _run_sample(logits, p, counter=4, emit=False)
    assert np.array_equal(a, b)  # same seed and counter: same tokens
    draws = [a]
    for c in range(5, 5 + (200 if ON_GPU else 0)):
        draws.append(_run_sample(logits, p, counter=c, emit=False)[0])
    draws = np.concatenate(draws)
    ref = sample_probs_ref(base.astype(np.float32), p)
    assert set(np.unique(draws)) <= set(np.flatnonzero(ref > 0))  # only tokens top-k keeps
    if ON_GPU:  # 12,864 draws: frequencies within 0.02 of the probabilities
        freq = np.bincount(draws, minlength=V) / draws.size
        assert np.abs(freq - ref).max() < 0.02
