"""Decode-side kernel of issue 5: the fused dequantize + GEMV on Qwen3-32B's matrix shapes.

    python bench/bench_quant_gemv.py --bits 4 --out bench/results/quant_gemv.json
    python bench/bench_quant_gemv.py --variants --out bench/results/quant_gemv_variants.json
    python bench/bench_quant_gemv.py --cold --out bench/results/quant_gemv_cold.json

Times each projection of one Qwen3-32B layer (random 4-bit weights, group 128, batch 1) from
CUDA-graph replays, and projects the weight-reading part of one decode token (64 layers + the
head) against the roofline: weight bytes per token / the copy bandwidth measured in the same run.
This is not the full decode step (attention, norms, sampling are not in it): a lower bound on
decode time per token, i.e. an upper bound on tokens/s.

--cold: the engine's fused shapes on x rounded beforehand (what a decode step runs), each timed over
enough copies of its matrix (>= 256 MB, five times L2) that every call reads from memory as decode
does, beside the same read pattern without the arithmetic (probe_read_bandwidth.gemv_read_kernel) and
the contiguous read ceiling: what the arithmetic costs and what the pattern costs, shape by shape.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

import koifish_cuda.compat  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import commit, copy_bandwidth, gpu_name, median_time, write_json  # noqa: E402

HIDDEN, INTER, HEADS, KV, HEAD_DIM, LAYERS, VOCAB = 5120, 25600, 64, 8, 128, 64, 151936
SHAPES = {"q_proj": (HEADS * HEAD_DIM, HIDDEN), "k_proj": (KV * HEAD_DIM, HIDDEN), "v_proj": (KV * HEAD_DIM, HIDDEN),
          "o_proj": (HIDDEN, HEADS * HEAD_DIM), "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN),
          "down_proj": (HIDDEN, INTER)}


def main():
    import cupy as cp

    from koifish_cuda.quant import dequant_matvec
    from koifish_cuda.quant_a8 import dequant_matvec4_a8

    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--act-bits", type=int, default=8, choices=(8, 16),
                    help="4-bit only: x rounded to int8 (the engine's default) or float32")
    ap.add_argument("--out", default="bench/results/quant_gemv.json")
    ap.add_argument("--cold", action="store_true", help="engine shapes, every call from memory (see above)")
    ap.add_argument("--cold-sweep", action="store_true",
                    help="with --cold: every (rows, warps) a block on each shape, cold, instead of the pattern")
    ap.add_argument("--variants", action="store_true",
                    help="time both 4-bit batch-1 kernels (float32 x, int8 x) on each shape")
    args = ap.parse_args()
    if args.variants:
        return variants(args)
    if args.cold:
        return cold(args)
    copy_bw = copy_bandwidth()
    rows, layer_time, layer_bytes = [], 0.0, 0
    for name, (N, K) in SHAPES.items():
        words = cp.asarray(np.random.default_rng(0).integers(0, 2**32, (N, K * args.bits // 32), dtype=np.uint32))
        ng = K // args.group
        scales = cp.random.random((N, ng), dtype=cp.float32) * 0.01
        zeros = cp.full((N, ng), 2 ** (args.bits - 1), dtype=cp.uint8)
        x = cp.random.standard_normal((1, K), dtype=cp.float32)
        out = cp.empty((1, N), dtype=cp.float32)
        if args.bits == 4 and args.act_bits == 8:
            t = median_time(lambda s: dequant_matvec4_a8(out, x, words, scales, zeros, args.group, s))
        else:
            t = median_time(lambda s: dequant_matvec(out, x, words, scales, zeros, args.bits, args.group, s))
        nbytes = words.nbytes + scales.nbytes + zeros.nbytes + x.nbytes + out.nbytes
        rows.append({"matrix": name, "N": N, "K": K, "us": t * 1e6, "GBps": nbytes / t / 1e9,
                     "share_of_copy": nbytes / t / copy_bw})
        layer_time += t
        layer_bytes += nbytes
        print(f"{name:<10} {N:>6} x {K:<6} {t * 1e6:8.1f} us {nbytes / t / 1e9:8.0f} GB/s {nbytes / t / copy_bw:6.0%}")
    head_bytes = VOCAB * HIDDEN * args.bits / 8  # the head at the same width, timed as the layers' mean rate
    token_bytes = LAYERS * layer_bytes + head_bytes
    token_time = LAYERS * layer_time + head_bytes / (layer_bytes / layer_time)
    roofline = copy_bw / token_bytes
    res = {"bits": args.bits, "act_bits": args.act_bits if args.bits == 4 else 16, "group": args.group, "copy_GBps": copy_bw / 1e9, "rows": rows,
           "weight_GB_per_token": token_bytes / 1e9, "projected_tokens_per_s": 1 / token_time,
           "roofline_tokens_per_s": roofline, "share_of_roofline": (1 / token_time) / roofline}
    print(f"weights per token {token_bytes / 1e9:.1f} GB; GEMV-only projection {1 / token_time:.1f} tokens/s; "
          f"roofline {roofline:.1f} tokens/s ({res['share_of_roofline']:.0%}); copy {copy_bw / 1e9:.0f} GB/s")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


# the shapes the engine multiplies: q/k/v and gate/up are fused by rows, plus the head
ENGINE = {"qkv": ((HEADS + 2 * KV) * HEAD_DIM, HIDDEN), "o_proj": (HIDDEN, HEADS * HEAD_DIM),
          "gate_up": (2 * INTER, HIDDEN), "down_proj": (HIDDEN, INTER), "lm_head": (VOCAB, HIDDEN)}


def cold(args):
    import cupy as cp

    from koifish_cuda import quant_a8
    from probe_read_bandwidth import read_ceiling, gemv_read_kernel

    copy_bw = copy_bandwidth()
    ceiling = read_ceiling()
    rows = []
    print(f"copy {copy_bw / 1e9:.0f} GB/s, contiguous read {ceiling / 1e9:.0f} GB/s")
    print(f"{'shape':<10}{'N x K':>14}{'copies':>7}{'GEMV us':>9}{'GB/s':>7}{'of read':>8}{'pattern GB/s':>13}{'of read':>8}")
    for shape, (N, K) in ENGINE.items():
        rng = np.random.default_rng(0)
        ng = K // args.group
        one = N * K // 2 + N * ng * 5
        C = max(1, -(-(256 << 20) // one))
        w0 = cp.asarray(rng.integers(0, 2**32, (N, K // 8), dtype=np.uint32))
        s0 = cp.asarray(rng.random((N, ng), dtype=np.float32) * 0.01 + 0.001)
        z0 = cp.asarray(rng.integers(0, 16, (N, ng), dtype=np.uint8))
        words, scales, zeros = ([a.copy() for _ in range(C)] for a in (w0, s0, z0))  # distinct memory, same values
        xq = (cp.empty(K // 4, cp.uint32), cp.empty(K // 16, cp.float32), cp.empty(K // 16, cp.int32))
        quant_a8.quantize_x16(cp.asarray(rng.standard_normal((1, K), dtype=np.float32)), *xq)
        out = cp.empty((1, N), cp.float32)
        turn = [0]

        def gemv(s):
            c = turn[0] % C
            turn[0] += 1
            quant_a8.dequant_matvec4_a8(out, xq, words[c], scales[c], zeros[c], args.group, s)

        t = median_time(gemv, 10, C)
        R, W = quant_a8.rows_warps_for(N, K, True)
        if args.cold_sweep:
            for rr in sorted(quant_a8.ROW_CHOICES):
                for ww in (1, 2, 3, 4, 6, 8):
                    def one_config(s, rr=rr, ww=ww):
                        c = turn[0] % C
                        turn[0] += 1
                        quant_a8.dequant_matvec4_a8(out, xq, words[c], scales[c], zeros[c], args.group, s,
                                                    rows=rr, warps=ww)
                    tc = median_time(one_config, 10, C)
                    rows.append({"shape": shape, "N": N, "K": K, "rows": rr, "warps": ww, "us": tc * 1e6,
                                 "default": (rr, ww) == (R, W), "GBps": one / tc / 1e9})
                    print(f"{shape:<10} {rr:>2} rows {ww} warps {tc * 1e6:8.1f} us{'  (default)' if (rr, ww) == (R, W) else ''}",
                          flush=True)
            continue
        BUF = 32 * W
        Kq = K // 16 // BUF * BUF  # whole turns of the pattern kernel (the tail left out)
        pout = cp.empty(N // R * BUF, cp.uint32)
        k = gemv_read_kernel(R, W, False)
        flat = [w.view(cp.uint64)[:, :Kq].copy().reshape(-1) for w in words] if Kq < K // 16 else \
            [w.view(cp.uint64).reshape(-1) for w in words]

        def pattern(s):
            c = turn[0] % C
            turn[0] += 1
            k[N // R, BUF, s](pout, flat[c], N, Kq)

        tp = median_time(pattern, 10, C)
        nbytes, pbytes = one, N * Kq * 8
        r = {"shape": shape, "N": N, "K": K, "copies": C, "rows": R, "warps": W, "us": t * 1e6,
             "GBps": nbytes / t / 1e9, "share_of_read": nbytes / t / ceiling, "share_of_copy": nbytes / t / copy_bw,
             "pattern_us": tp * 1e6, "pattern_GBps": pbytes / tp / 1e9, "pattern_share_of_read": pbytes / tp / ceiling}
        rows.append(r)
        print(f"{shape:<10}{f'{N} x {K}':>14}{C:>7}{r['us']:>9.1f}{r['GBps']:>7.0f}{r['share_of_read']:>8.0%}"
              f"{r['pattern_GBps']:>13.0f}{r['pattern_share_of_read']:>8.0%}")
    write_json(args.out, {"gpu": gpu_name(), "commit": commit(), "copy_GBps": copy_bw / 1e9,
                          "read_GBps": ceiling / 1e9, "group": args.group, "rows": rows})


def variants(args):
    """Both 4-bit batch-1 kernels on every shape (the separate projections and the engine's fused
    ones); each output is compared with the float32-x kernel's on the same inputs: the int8-x kernel
    differs by the rounding of x (~5e-3 relative, tests/test_quant_a8.py), so its bound is 2e-2."""
    import cupy as cp

    from koifish_cuda import quant, quant_a8

    def a8(block_rows):
        return lambda out, x, words, scales, zeros, group, s: quant_a8.dequant_matvec4_a8(out, x, words, scales, zeros,
                                                                                          group, s, rows=block_rows)

    rounded = {}  # this shape's x as quantize_x16's triple (rounded once, outside the timing; cleared a shape)

    def pre(block_rows, warps):
        def fn(out, x, words, scales, zeros, group, s):
            if not rounded:
                K = x.shape[1]
                rounded["x"] = (cp.empty(K // 4, cp.uint32), cp.empty(K // 16, cp.float32), cp.empty(K // 16, cp.int32))
                quant_a8.quantize_x16(x, *rounded["x"], s)
            quant_a8.dequant_matvec4_a8(out, rounded["x"], words, scales, zeros, group, s, rows=block_rows, warps=warps)
        return fn

    GEMV4_VARIANTS = {
        "float32 x": (lambda out, x, words, scales, zeros, group, s: quant.dequant_matvec(out, x, words, scales, zeros,
                                                                                        4, group, s), 1e-4),
        "int8 x (dp4a), rows by shape": (a8(None), 2e-2),
        "rounded x, by shape": (pre(None, None), 2e-2),
        **{f"rounded x, {n} rows {w} warps": (pre(n, w), 2e-2) for n in (8, 16) for w in (1, 3)}}
    names = list(GEMV4_VARIANTS)
    copy_bw = copy_bandwidth()
    shapes = {**SHAPES, **{k: v for k, v in ENGINE.items() if k not in SHAPES}}
    rows = []
    for shape, (N, K) in shapes.items():
        rounded.clear()
        rng = np.random.default_rng(0)
        words = cp.asarray(rng.integers(0, 2**32, (N, K // 8), dtype=np.uint32))
        ng = K // args.group
        scales = cp.asarray(rng.random((N, ng), dtype=np.float32) * 0.01 + 0.001)
        zeros = cp.asarray(rng.integers(0, 16, (N, ng), dtype=np.uint8))
        x = cp.asarray(rng.standard_normal((1, K), dtype=np.float32))
        nbytes = words.nbytes + scales.nbytes + zeros.nbytes + x.nbytes + 4 * N
        ref = None
        for name in names:
            fn = GEMV4_VARIANTS[name][0]
            out = cp.full((1, N), cp.nan, dtype=cp.float32)
            fn(out, x, words, scales, zeros, args.group, 0)
            cp.cuda.Device().synchronize()
            if ref is None:
                ref = out.copy()
            err = float(cp.linalg.norm(out - ref) / cp.linalg.norm(ref)) if bool(cp.isfinite(out).all()) else float("inf")
            t = median_time(lambda s: fn(out, x, words, scales, zeros, args.group, s))
            r = {"shape": shape, "N": N, "K": K, "variant": name, "us": t * 1e6, "GBps": nbytes / t / 1e9,
                 "share_of_copy": nbytes / t / copy_bw, "rel_err_vs_first": err}
            rows.append(r)
            print(f"{shape:<10} {N:>6} x {K:<6} {name:<30} {t * 1e6:8.1f} us {r['GBps']:7.0f} GB/s "
                  f"{r['share_of_copy']:6.0%}  rel err {err:.1e}", flush=True)
        del words, scales, zeros, x, out, ref
        cp.get_default_memory_pool().free_all_blocks()
    # one decode token's GEMVs as the engine runs them: 64 x (qkv + o + gate_up + down) + the head
    token = {}
    for name in names:
        us = {r["shape"]: r["us"] for r in rows if r["variant"] == name}
        ok = all(r["rel_err_vs_first"] < GEMV4_VARIANTS[name][1] for r in rows if r["variant"] == name)
        token[name] = {"us": LAYERS * sum(us[k] for k in ("qkv", "o_proj", "gate_up", "down_proj")) + us["lm_head"],
                       "correct": ok}
    best = min((n for n in names if token[n]["correct"]), key=lambda n: token[n]["us"])
    for name in names:
        print(f"token GEMVs {name:<30} {token[name]['us'] / 1e3:7.2f} ms  correct {token[name]['correct']}")
    print(f"best {best}")
    # the int8 kernels' rows a block chosen shape by shape (what a per-shape table in the engine would give)
    a8_names = [n for n in names if n.startswith("rounded") and token[n]["correct"]]
    per_shape = {shape: min((r for r in rows if r["shape"] == shape and r["variant"] in a8_names), key=lambda r: r["us"])
                 for shape in ENGINE}
    mixed = LAYERS * sum(per_shape[k]["us"] for k in ("qkv", "o_proj", "gate_up", "down_proj")) + per_shape["lm_head"]["us"]
    # rounding x apart costs a kernel a GEMV input (4 a layer, and the head's): its time in a graph
    quant_us = {}
    for K in sorted({K for _, K in ENGINE.values()}):
        x = cp.asarray(np.random.default_rng(1).standard_normal((1, K), dtype=np.float32))
        tri = (cp.empty(K // 4, cp.uint32), cp.empty(K // 16, cp.float32), cp.empty(K // 16, cp.int32))
        quant_us[K] = median_time(lambda s: quant_a8.quantize_x16(x, *tri, s)) * 1e6
        print(f"quantize_x16 K={K:<6} {quant_us[K]:6.1f} us")
    quant_token = LAYERS * sum(quant_us[K] for n, (_, K) in ENGINE.items() if n != "lm_head") + quant_us[ENGINE["lm_head"][1]]
    print(f"token quantize_x16 kernels {quant_token / 1e3:7.2f} ms (add to 'rounded before' for its whole cost)")
    print(f"token GEMVs rounded x, best per shape {mixed / 1e3:7.2f} ms: "
          + ", ".join(f"{k} {v['variant']}" for k, v in per_shape.items()))
    write_json(args.out, {"bits": 4, "group": args.group, "device": gpu_name(), "commit": commit(),
                          "copy_GBps": copy_bw / 1e9, "rows": rows, "token_gemv": token, "best": best,
                          "quantize_x16_us": quant_us, "token_quantize_x16_us": quant_token,
                          "int8_best_rows_per_shape": {"us": mixed, "variants": {k: v["variant"] for k, v in
                                                                                  per_shape.items()}}})


if __name__ == "__main__":
    main()
