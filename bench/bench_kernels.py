"""Bandwidth of the memory-bound kernels against a device-to-device copy measured in the same run.

    python bench/bench_kernels.py --out bench/kernels.json
    python bench/bench_kernels.py --sweep --out bench/kernels_sweep.json   (LayerNorm's grid and rows in flight)

Bytes are the fewest each kernel must move (every input read once, every output written once);
times are CUDA-event medians of graph-replayed launches on GPT-2 124M shapes (B=8, T=1024).
Rows marked bf16 are the variants the training engine runs under precision.compute bf16 (bf16
bits in or out where the engine keeps a GEMM operand).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import koifish_cuda.compat  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import commit, copy_bandwidth, gpu_name, median_time, write_json  # noqa: E402,F401


def main():
    import cupy as cp

    from koifish_cuda.adamw import adamw_update, sum_squares
    from koifish_cuda.attention import softmax_causal_forward
    from koifish_cuda.classifier import fused_classifier
    from koifish_cuda.embedding import encoder_backward, encoder_forward
    from koifish_cuda.gelu import bias_gelu_forward, gelu_backward, gelu_forward
    from koifish_cuda.layernorm import layernorm_backward, layernorm_forward
    from koifish_cuda.matmul import bias_grad
    from koifish_cuda.residual import residual_forward

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/kernels.json")
    ap.add_argument("--sweep", action="store_true",
                    help="LayerNorm forward/backward over grids and rows in flight; the stream classifier's unroll and grid")
    ap.add_argument("--match", default="", help="with --sweep: only the cases whose name holds one of these (comma-separated)")
    args = ap.parse_args()
    if args.sweep:
        return sweep(args)
    B, T, C, nh, V, Vp = 8, 1024, 768, 12, 50257, 50304
    N, F4 = B * T, 4 * 768
    rnd = lambda *s: cp.random.standard_normal(s, dtype=cp.float32)  # noqa: E731
    copy_bw = copy_bandwidth()

    x, w, b, out, mean, rstd = rnd(N, C), rnd(C), rnd(C), rnd(N, C), rnd(N), rnd(N)
    dx, dw, db, dout = rnd(N, C), rnd(C), rnd(C), rnd(N, C)
    pre, act, bias4 = rnd(N, F4), rnd(N, F4), rnd(F4) * 0.0  # zero bias: pre stays bounded over replays
    att = rnd(B * nh, T, T)
    logits, losses, loss_sum, targets = rnd(N, Vp), rnd(N), rnd(1), cp.random.randint(0, V, N).astype(cp.int32)
    n_par = 124_475_904
    params, grads, m, v = rnd(n_par), rnd(n_par), rnd(n_par), cp.abs(rnd(n_par))
    mask, norm_sq = cp.ones(n_par, cp.uint8), cp.zeros(1, cp.float32)
    hyper = cp.asarray(np.array([1e-4, 0.9, 0.95, 1e-8, 0.1, 0.1, 0.05, 0.0], np.float32))
    f, h = 4, 2  # bytes per float32, per bf16
    bf = lambda *s: (rnd(*s).view(cp.uint32) >> 16).astype(cp.uint16)  # noqa: E731  (bf16 bits, truncated)
    out16, dx16, act16, pre16, logits16 = bf(N, C), bf(N, C), bf(N, F4), bf(N, F4), bf(N, Vp)
    x16, dout16, dxb16, dsum = bf(N, C), bf(N, C), bf(N, C), rnd(C)  # precision.residual(_grad) bf16
    db4 = rnd(F4)
    idx, wte, wpe = cp.random.randint(0, V, (B, T)).astype(cp.int32), rnd(Vp, C), rnd(T, C)
    dwte, dwpe = cp.zeros((Vp, C), cp.float32), cp.zeros((T, C), cp.float32)
    cases = [
        ("layernorm_forward", lambda s: layernorm_forward(out, mean, rstd, x, w, b, s), (2 * N * C + 2 * N) * f),
        ("layernorm_backward", lambda s: layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, s), (4 * N * C + 2 * N) * f),
        ("bias_gelu_forward", lambda s: bias_gelu_forward(act, pre, bias4, s), 3 * N * F4 * f),
        ("gelu_backward", lambda s: gelu_backward(act, pre, act, s), 3 * N * F4 * f),
        ("residual_forward", lambda s: residual_forward(out, x, dout, s), 3 * N * C * f),
        ("softmax_causal (T=1024)", lambda s: softmax_causal_forward(att, 0.125, s), 2 * att.size * f),
        ("fused_classifier", lambda s: fused_classifier(logits, losses, loss_sum, targets, V, 1.0 / N, s), 2 * N * Vp * f),
        ("layernorm_forward bf16 out", lambda s: layernorm_forward(out16, mean, rstd, x, w, b, s),
         N * C * (f + h) + 2 * N * f),
        ("layernorm_backward + bf16 dx", lambda s: layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, s, dx16=dx16),
         (4 * N * C + 2 * N) * f + N * C * h),
        ("layernorm_forward all bf16 (a warp a row)", lambda s: layernorm_forward(out16, mean, rstd, x16, w, b, s),
         2 * N * C * h + 2 * N * f),
        ("layernorm_backward all bf16 (a warp a row)",
         lambda s: layernorm_backward(dxb16, dw, db, dout16, x16, w, mean, rstd, s, dsum=dsum), 4 * N * C * h + 2 * N * f),
        ("gelu_forward bf16 (16-byte; remat 1, variant gelu=kernel)", lambda s: gelu_forward(act16, pre16, s),
         2 * N * F4 * h),
        ("gelu_forward bf16 pairs (4-byte)", lambda s: gelu_forward(act16, pre16, s, vector=False), 2 * N * F4 * h),
        ("bias_grad bf16 (N, 4C)", lambda s: bias_grad(db4, act16, s), N * F4 * h),
        ("bias_grad bf16 (N, 4C) row groups", lambda s: bias_grad(db4, act16, s, vector=True), N * F4 * h),
        ("fused_classifier bf16", lambda s: fused_classifier(logits16, losses, loss_sum, targets, V, 1.0 / N, s),
         2 * N * Vp * h),
        ("fused_classifier bf16 split", lambda s: fused_classifier(logits16, losses, loss_sum, targets, V, 1.0 / N,
                                                                   s, variant="split"), 2 * N * Vp * h),
        ("fused_classifier bf16 stream", lambda s: fused_classifier(logits16, losses, loss_sum, targets, V, 1.0 / N,
                                                                    s, variant="stream"), 2 * N * Vp * h),
        ("sum_squares (124M)", lambda s: sum_squares(norm_sq, grads, s), n_par * f),
        ("sum_squares (124M) scalar loads", lambda s: sum_squares(norm_sq, grads, s, vector=False), n_par * f),
        ("adamw (124M)", lambda s: adamw_update(params, grads, m, v, mask, norm_sq, hyper, s), (7 * n_par * f + n_par)),
        ("adamw (124M) scalar", lambda s: adamw_update(params, grads, m, v, mask, norm_sq, hyper, s, vector=False),
         (7 * n_par * f + n_par)),
        # wte rows read and out written; backward: dout read, each value reduced into a dwte row (in L2)
        ("encoder_forward", lambda s: encoder_forward(out, idx, wte, wpe, s), 2 * N * C * f),
        ("encoder_backward", lambda s: encoder_backward(dwte, dwpe, dout, idx, s), 2 * N * C * f),
    ]
    print(f"{'kernel':<44} {'time ms':>9} {'GB/s':>8} {'% copy':>7}")
    rows = _timed(cases, "", copy_bw)
    print(f"{'device copy':<44} {'':>9} {copy_bw / 1e9:>8.0f} {1:>7.0%}")
    write_json(args.out, {"gpu": gpu_name(), "commit": commit(), "copy_GBps": copy_bw / 1e9, "rows": rows})


def sweep(args):
    """LayerNorm at the engine's shapes (B=16, T=1024; GPT-2 124M and 1558M widths): the forward's
    grid, the backward's grid and rows in flight (bf16 out / bf16 dout and dx copy, as the engine with a
    float32 residual; then all bf16 with dx in place, as with precision.residual_grad bf16)."""
    import cupy as cp

    from koifish_cuda import layernorm_bf16
    from koifish_cuda.layernorm import layernorm_backward, layernorm_forward

    copy_bw = copy_bandwidth()
    N, f, h = 16384, 4, 2
    rows = []
    print(f"{'kernel':<44} {'time ms':>9} {'GB/s':>8} {'% copy':>7}")
    for C in (768, 1024, 1600):
        rnd = lambda *s: cp.random.standard_normal(s, dtype=cp.float32)  # noqa: E731
        bf = lambda *s: (rnd(*s).view(cp.uint32) >> 16).astype(cp.uint16)  # noqa: E731
        x, w, b, mean, rstd, dx, dw, db = rnd(N, C), rnd(C), rnd(C), rnd(N), cp.abs(rnd(N)), rnd(N, C), rnd(C), rnd(C)
        out16, dout16, dx16 = bf(N, C), bf(N, C), bf(N, C)
        cases = [(f"C={C} forward {'vector' if v else 'scalar'} blocks={g}",  # N // 8: a block every 8 rows
                  lambda s, g=g, v=v: layernorm_forward(out16, mean, rstd, x, w, b, s, blocks=g, vector=v),
                  N * C * (f + h) + 2 * N * f) for v in (True, False) for g in (N // 8, 132 * 8, 132 * 16)]
        cases += [(f"C={C} backward rows={r} blocks={g}{' fit' if fit else ''}",
                   lambda s, r=r, g=g, fit=fit: layernorm_backward(dx, dw, db, dout16, x, w, mean, rstd, s, blocks=g,
                                                                   dx16=dx16, rows=r, fit=fit),
                   N * C * (3 * f + 2 * h) + 2 * N * f)
                  for r in (1, 2) for g in (528, 792, 1056) for fit in (False, True)]
        # precision.residual (and residual_grad) bf16: x, dout and dx bf16, dx in place, its column sums (dsum)
        x16, ds = bf(N, C), rnd(C)
        # (wide: layernorm_bf16's warp-per-row kernels, at the widths they take)
        cases += [(f"C={C} bf16 residual forward blocks={g}{' wide' if wide else ''}",
                   lambda s, g=g, wide=wide: layernorm_forward(out16, mean, rstd, x16, w, b, s, blocks=g, wide=wide),
                   2 * N * C * h + 2 * N * f) for wide in (False, True) for g in (132 * 4, 132 * 8, 132 * 16)]
        if layernorm_bf16.fits(C, (out16, x16), (w, b)):
            cases += [(f"C={C} bf16 residual forward blocks={g} wide rows={r}",
                       lambda s, g=g, r=r: layernorm_bf16.forward(out16, mean, rstd, x16, w, b, s, blocks=g, rows=r),
                       2 * N * C * h + 2 * N * f) for r in (1, 4) for g in (132 * 4, 132 * 8, 132 * 16)]
        cases += [(f"C={C} bf16 residual backward rows={r} blocks={g}",
                   lambda s, r=r, g=g: layernorm_backward(dx16, dw, db, dout16, x16, w, mean, rstd, s, blocks=g,
                                                          dsum=ds, rows=r, wide=False),
                   4 * N * C * h + 2 * N * f) for r in (1, 2) for g in (528, 1056)]
        if layernorm_bf16.fits(C, (dx16, dout16, x16), (w, dw, db, ds)):
            cases += [(f"C={C} bf16 residual backward wide {p} an SM",
                       lambda s, p=p: layernorm_bf16.backward(dx16, dw, db, dout16, x16, w, mean, rstd, s, ds, per_sm=p),
                       4 * N * C * h + 2 * N * f) for p in (2, 3, 4, 5)]
        rows += _timed(cases, args.match, copy_bw)
    rows += _timed(_classifier_stream_cases(cp), args.match, copy_bw)
    rows += _timed(_bias_grad_cases(cp), args.match, copy_bw)
    write_json(args.out, {"gpu": gpu_name(), "commit": commit(), "copy_GBps": copy_bw / 1e9, "rows": rows})


def _timed(cases, match: str, copy_bw: float) -> list[dict]:
    """Each (name, fn, bytes) case whose name holds one of match's comma-separated parts ("" takes all)
    timed, printed as a row and returned."""
    rows = []
    for name, fn, nbytes in cases:
        if not any(m in name for m in match.split(",")):
            continue
        t = median_time(fn)
        bw = nbytes / t
        rows.append({"kernel": name, "ms": t * 1e3, "GBps": bw / 1e9, "share_of_copy": bw / copy_bw})
        print(f"{name:<44} {t * 1e3:>9.3f} {bw / 1e9:>8.0f} {bw / copy_bw:>7.0%}")
    return rows


def _bias_grad_cases(cp) -> list:
    """The engine's bias gradients (c_fc's over (N, 4C), c_attn's over (N, 3C), bf16) at B=16, T=1024: the
    32-bit kernel (64-row slabs) and the row-group blocks over slabs of 128 to 512 rows."""
    from koifish_cuda.matmul import bias_grad

    cases = []
    for width in (3072, 2304):
        dout = (cp.random.standard_normal((16384, width), dtype=cp.float32).view(cp.uint32) >> 16).astype(cp.uint16)
        db = cp.zeros(width, cp.float32)
        cases.append((f"bias_grad (16384, {width}) pairs", lambda s, d=dout, b=db: bias_grad(b, d, s), dout.nbytes))
        cases += [(f"bias_grad (16384, {width}) groups rows={g}",
                   lambda s, d=dout, b=db, g=g: bias_grad(b, d, s, vector=True, group_rows=g), dout.nbytes)
                  for g in (128, 256, 512)]
    return cases


def _classifier_stream_cases(cp) -> list:
    """The stream classifier on one of the engine's 4096-row chunks of GPT-2's logits: groups in flight a
    thread (STREAM_UNROLL) and blocks (STREAM_ROWS, each walking rows), set for the call; then its block
    (classifier.stream_threads: 544 threads take a 25152-word row in six turns of two groups a thread, 512
    in seven). Measured and dropped (stop 21): each block asking L2 for its next row as its second pass
    began (0.354 ms against 0.300), and rows taken last to first in the step (no change)."""
    from koifish_cuda import classifier

    N, V, Vp = 4096, 50257, 50304
    logits = (cp.random.standard_normal((N, Vp), dtype=cp.float32).view(cp.uint32) >> 16).astype(cp.uint16)
    losses, loss_sum = cp.zeros(N, cp.float32), cp.zeros(1, cp.float32)
    targets = cp.random.randint(0, V, N).astype(cp.int32)

    def run(s, U, rows, threads=None):
        keep = classifier.STREAM_UNROLL, classifier.STREAM_ROWS
        classifier.STREAM_UNROLL, classifier.STREAM_ROWS = U, rows
        try:
            classifier.fused_classifier(logits, losses, loss_sum, targets, V, 1.0 / N, s, variant="stream",
                                        threads=threads)
        finally:
            classifier.STREAM_UNROLL, classifier.STREAM_ROWS = keep

    cases = [(f"classifier stream U={U} blocks={rows}", lambda s, U=U, rows=rows: run(s, U, rows), 2 * N * Vp * 2)
             for U in (1, 2, 4) for rows in (132, 264, 528)]
    U, rows = classifier.STREAM_UNROLL, classifier.STREAM_ROWS
    return cases + [(f"classifier stream threads={t}", lambda s, t=t: run(s, U, rows, t), 2 * N * Vp * 2)
                    for t in (512, 544)]


if __name__ == "__main__":
    main()
