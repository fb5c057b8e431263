"""The Qwen3 engine's memory-bound kernels one by one, at Qwen3-32B's shapes (batch 1), from CUDA-graph
replays: microseconds, GB/s and the share of the copy bandwidth measured in the same run.

    python bench/bench_qwen3_kernels.py --out bench/results/qwen3_kernels.json

Decode (one token): add_rmsnorm, q/k norm + RoPE, attention over 1k and 8k keys, SwiGLU.
Prefill (a 2,048-token chunk): the causal softmax over one layer's four query tiles, merge_heads,
q/k norm + RoPE.
Bytes are what a kernel must move at least (reads + writes), so the share is a lower bound.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import commit, copy_bandwidth, gpu_name, median_time, write_json  # noqa: E402

HIDDEN, INTER, HEADS, KV, HD = 5120, 25600, 64, 8, 128


def main():
    import cupy as cp

    import koifish_cuda.attention_prefill as ap
    from koifish_cuda.attention_decode import attention_decode, attention_scratch
    from koifish_cuda.rmsnorm import add_rmsnorm, add_rmsnorm_x16
    from koifish_cuda.rope import qk_norm_rope, rope_tables
    from koifish_cuda.swiglu import swiglu

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/qwen3_kernels.json")
    parser.add_argument("--splits", default="", help="also time the decode attention's two kernels apart at these "
                        "split counts (e.g. 16,32,64,128) and print their register counts")
    args = parser.parse_args()
    copy = copy_bandwidth()
    rng = np.random.default_rng(0)
    rows = []

    def report(name, fn, nbytes):
        t = median_time(fn)
        rows.append({"kernel": name, "us": t * 1e6, "GBps": nbytes / t / 1e9, "share_of_copy": nbytes / t / copy})
        print(f"{name:<34}{t * 1e6:>9.1f} us{nbytes / t / 1e9:>8.0f} GB/s{nbytes / t / copy:>6.0%}", flush=True)

    def f32(*shape, scale=1.0):
        return cp.asarray(rng.standard_normal(shape, dtype=np.float32) * scale)

    # ---- decode, batch 1
    x, d, w, xn = f32(1, HIDDEN), f32(1, HIDDEN), f32(HIDDEN), f32(1, HIDDEN)
    report("decode add_rmsnorm 1x5120", lambda s: add_rmsnorm(xn, x, d, w, 1e-6, s), 4 * HIDDEN * 5)
    xq = (cp.zeros(HIDDEN // 4, cp.uint32), cp.zeros(HIDDEN // 16, cp.float32), cp.zeros(HIDDEN // 16, cp.int32))
    report("decode add_rmsnorm_x16 1x5120", lambda s: add_rmsnorm_x16(xn, xq, x, d, w, 1e-6, s),
           4 * HIDDEN * 5 + HIDDEN + 8 * HIDDEN // 16)
    W = (HEADS + 2 * KV) * HD
    max_len = 8192 + 64
    qkv = f32(1, W)
    kc = cp.zeros((1, KV, max_len, HD), cp.float16)
    vc = cp.zeros((1, KV, max_len, HD), cp.float16)
    cos, sin = (cp.asarray(a) for a in rope_tables(max_len, HD, 1e6))
    qn, kn = f32(HD), f32(HD)
    q = cp.zeros((1, HEADS * HD), cp.float32)
    pos = cp.asarray([1000], np.int64)
    report("decode qk_norm_rope", lambda s: qk_norm_rope(q, kc, vc, qkv, qn, kn, cos, sin, pos, 1, HEADS, 1e-6, s),
           4 * W + 4 * HEADS * HD + 2 * 2 * KV * HD)
    kc[...] = cp.asarray(rng.standard_normal(kc.shape, dtype=np.float32)).astype(cp.float16)
    vc[...] = kc
    att = cp.zeros((1, HEADS * HD), cp.float32)
    scratch = attention_scratch(cp, 1, HEADS, HD, 64)
    scratches = {S: attention_scratch(cp, 1, HEADS, HD, S) for S in (16, 32, 48)}
    scratches[64] = scratch
    for ctx in (1024, 8192):
        pos[...] = ctx - 1
        for S in (16, 32, 48):  # the tensor-core kernel at three split counts (a split takes 64 keys at least)
            report(f"decode attention ctx {ctx} mma S={S}", lambda s, S=S: attention_decode(
                att, q, kc, vc, pos, 1, scratches[S], s, variant="mma"), 2 * KV * ctx * HD * 2)
        for variant in ("warps", "tiles"):  # the engine's, and the int8 cache's (float caches measured slower)
            report(f"decode attention ctx {ctx} {variant}",
                   lambda s, v=variant: attention_decode(att, q, kc, vc, pos, 1, scratch, s, variant=v),
                   2 * KV * ctx * HD * 2)
    if args.splits:  # the split and merge kernels apart, at other split counts
        from koifish_cuda.attention_decode import THREADS, _merge_kernel, _split_kernel
        from koifish_cuda.prefetch import no_prefetch
        split_k = _split_kernel(HD, HEADS // KV, False)
        for S in (int(v) for v in args.splits.split(",")):
            po, pm, pl = attention_scratch(cp, 1, HEADS, HD, S)
            for ctx in (1024, 8192):
                pos[...] = ctx - 1
                report(f"  split kernel S={S} ctx {ctx}", lambda s: split_k[(KV, S), THREADS, s](
                    po, pm, pl, q, kc, vc, (), pos, 1, np.float32(HD ** -0.5)), 2 * KV * ctx * HD * 2)
            report(f"  merge kernel S={S}", lambda s: _merge_kernel(False)[HEADS, THREADS, s](att, po, pm, pl, (), pos, 1, 1,
                                                                                no_prefetch(att)),
                   4 * HEADS * S * (HD + 2))
        print("registers a thread: split", list(split_k.get_regs_per_thread().values()), "merge",
              list(_merge_kernel(False).get_regs_per_thread().values()))
    gu, h = f32(1, 2 * INTER), cp.zeros((1, INTER), cp.float32)
    report("decode swiglu 25600", lambda s: swiglu(h, gu, s), 4 * 3 * INTER)
    del kc, vc

    # ---- prefill, one 2,048-token chunk at position 0 (one layer)
    T, n_rep = 2048, HEADS // KV
    scr = cp.empty(KV * T * n_rep * T, cp.float32)  # the tiles' scores share it (values do not matter)
    pbuf = cp.empty(KV * T * n_rep * T, cp.float16)
    calls, nbytes = [], 0
    for t0 in range(0, T, ap.QUERY_TILE):
        tq = ap.QUERY_TILE
        r, L = KV * tq * n_rep, t0 + tq
        sv = scr[:r * L].reshape(r, L)
        sv[...] = cp.asarray(rng.standard_normal((r, L), dtype=np.float32) * 3)
        calls.append((pbuf[:r * L].reshape(r, L), sv, t0, tq * n_rep, n_rep))
        nbytes += r * L * 2 + 4 * sum(min(L, t0 + i + 1) for i in range(tq)) * KV * n_rep  # p written, visible s read
    report("prefill causal_softmax (4 tiles)", lambda s: [ap.causal_softmax(*c, stream=s) for c in calls] and None,
           nbytes)
    del scr, pbuf
    cp.get_default_memory_pool().free_all_blocks()
    o = cp.asarray(rng.standard_normal((KV * T * n_rep, HD), dtype=np.float32)).astype(cp.float16)
    attb = cp.zeros((T, HEADS * HD), cp.uint16)
    report("prefill merge_heads 2048", lambda s: ap.merge_heads(attb, o, T, n_rep, s), 4 * T * HEADS * HD)
    qkv = f32(T, W)
    qh = cp.zeros((T * HEADS, HD), cp.float16)
    kc = cp.zeros((1, KV, T, HD), cp.float16)
    vc = cp.zeros((1, KV, T, HD), cp.float16)
    pos[...] = 0
    report("prefill qk_norm_rope 2048", lambda s: qk_norm_rope(qh, kc, vc, qkv, qn, kn, cos, sin, pos, T, HEADS, 1e-6,
                                                               s, regroup=True), T * (4 * W + 2 * W))
    write_json(args.out, {"gpu": gpu_name(), "commit": commit(), "copy_GBps": copy / 1e9, "rows": rows})


if __name__ == "__main__":
    main()
