"""Where a training step's time goes: the CUDA engine's micro-batch graph (forward + backward)
re-captured with only one group of launches kept, each replay timed with CUDA events.

    python bench/profile_step.py --size 124M --batch 16 --out bench/profile.json

Groups: the cuBLASLt GEMMs, the attention (cuDNN's, or the cuBLAS path's batched GEMMs beside its
softmax and head copies) and each kernel module's launchers. Launches left
out are replaced by no-ops, so each row is the time of that group alone on the real buffers;
the rows add up to about the full graph (the remainder is launch gaps between kernels).
Then the step's other graphs (zero, norm, update) and the whole step as train_step runs it, and
each distinct GEMM of a micro-batch: its time with its epilogue, the same product without one,
and TFLOP/s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import commit, engine_options, gpu_name, write_json  # noqa: E402

GROUPS = {
    "embedding": ("koifish_cuda.embedding", ("encoder_forward", "encoder_backward")),
    "layernorm": ("koifish_cuda.layernorm", ("layernorm_forward", "layernorm_backward")),
    "gelu (remat 1's rebuild)": ("koifish_cuda.gelu", ("gelu_forward",)),
    "bias gradients": ("koifish_cuda.matmul", ("bias_grad",)),
    "heads split/merge": ("koifish_cuda.attention", ("split_heads", "merge_heads")),
    "softmax causal": ("koifish_cuda.attention", ("softmax_causal_forward", "softmax_causal_backward")),
    "classifier": ("koifish_cuda.classifier", ("fused_classifier",)),
}


def replay_ms(eng, reps=10, name=None):
    import cupy as cp

    graph = eng.graphs[name] if name else eng.graphs.get("micro") or eng.graphs["micro_last"]
    graph.launch(eng.stream)
    a, b = cp.cuda.Event(), cp.cuda.Event()
    a.record(eng.stream)
    for _ in range(reps):
        graph.launch(eng.stream)
    b.record(eng.stream)
    b.synchronize()
    return cp.cuda.get_elapsed_time(a, b) / reps


def main():
    import importlib

    from bench_train import koifish_step, precision

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="124M")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--compute", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--attention", default="auto", choices=("auto", "cudnn", "cublas"))
    engine_options(ap)
    ap.add_argument("--out", default="bench/profile.json")
    args = ap.parse_args()

    B, T = args.batch, args.seq
    step, eng, options = koifish_step(args.size, B, T, compute=args.compute, attention=args.attention, options=args)
    step()
    rows = [{"group": "full micro-batch graph", "ms": replay_ms(eng)}]

    # group -> (owner of the launchers: a module or an object, their names)
    groups = {"cuBLASLt GEMMs + epilogues": (eng.lt, ("matmul",)),
              **{g: (importlib.import_module(mod), fns) for g, (mod, fns) in GROUPS.items()}}
    if eng.attn.name == "cudnn":
        groups["attention (cuDNN)"] = (eng.attn.op, ("forward", "backward"))
    else:
        groups["attention's batched GEMMs (cuBLAS)"] = (eng.attn.blas, ("batched_gemm",))
    originals = {(g, fn): getattr(owner, fn) for g, (owner, fns) in groups.items() for fn in fns}
    noop = lambda *a, **k: None  # noqa: E731

    def keep(group):
        for (g, fn), f in originals.items():
            setattr(groups[g][0], fn, f if g == group else noop)
        eng._capture(1)

    for group in groups:
        keep(group)
        rows.append({"group": group, "ms": replay_ms(eng)})
    for (g, fn), f in originals.items():
        setattr(groups[g][0], fn, f)
    eng._capture(1)
    for name in ("zero", "norm", "update"):
        rows.append({"group": f"graph: {name}", "ms": replay_ms(eng, name=name)})
    rows.append({"group": "train_step (host loop)", "ms": step_ms(eng, B, T)})
    total = rows[0]["ms"]
    for r in rows:
        r["share"] = r["ms"] / total
    gpu = gpu_name()
    print(f"{args.size} B={B} T={T} {args.compute} attention {eng.attn.name} variants {eng.variants} on {gpu}\n"
          f"{'group':>26} {'ms':>8} {'share':>6}")
    for r in rows:
        print(f"{r['group']:>26} {r['ms']:>8.2f} {r['share']:>6.1%}")
    gemms = gemm_rows(eng)
    print(f"{'M':>6} {'N':>6} {'K':>6} {'op':>3} {'epilogue':>14} {'calls':>5} {'ms':>7} {'TFLOP/s':>8} {'plain ms':>8}")
    for r in gemms:
        print(f"{r['M']:>6} {r['N']:>6} {r['K']:>6} {r['op']:>3} {r['epilogue']:>14} {r['calls']:>5} {r['ms']:>7.3f} "
              f"{r['tflops']:>8.0f} {r['plain_ms']:>8.3f}")
    print(f"GEMMs of a micro-batch: {sum(r['ms'] * r['calls'] for r in gemms):.2f} ms "
          f"({sum(r['plain_ms'] * r['calls'] for r in gemms):.2f} without epilogues)")
    write_json(args.out, {"gpu": gpu, "commit": commit(), "size": args.size, "batch": B, "seq": T,
                          **precision(args.compute, args), "attention": eng.attn.name, **options,
                          "rows": rows, "gemms": gemms})


def step_ms(eng, B, T, steps=10):
    """Wall time of train_step (graphs, the batch's upload, the one sync) per step."""
    import time

    import numpy as np

    rng = np.random.default_rng(1)
    batch = [(rng.integers(0, 50257, (B, T)), rng.integers(0, 50257, (B, T)))]
    eng.train_step(batch, 1e-4)
    eng.stream.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        eng.train_step(batch, 1e-4)
    eng.stream.synchronize()
    return (time.perf_counter() - t) / steps * 1e3


def distinct_gemms(eng) -> dict:
    """The cuBLASLt calls of one forward + backward of the engine, recorded as made: {(M, N, K, op, epilogue,
    out dtype): [calls, (out, a, b, keywords) of the first]}; op is 'NT' for out = a @ b.T, and so on."""
    calls, original = [], eng.lt.matmul

    def record(out, a, b, **kw):
        calls.append((out, a, b, kw))
        return original(out, a, b, **kw)

    eng.lt.matmul = record
    try:
        with eng.stream:
            eng._forward(1.0 / eng.N, backward=True)
            eng._backward()
            eng.stream.synchronize()
    finally:
        eng.lt.matmul = original
    distinct = {}
    for out, a, b, kw in calls:
        ta, tb = kw.get("trans_a", False), kw.get("trans_b", False)
        key = (*out.shape, a.shape[0] if ta else a.shape[1], ("T" if ta else "N") + ("T" if tb else "N"),
               kw.get("epilogue", "default") + ("+c" if kw.get("c") is not None else ""), out.dtype.name)
        distinct.setdefault(key, [0, (out, a, b, kw)])[0] += 1
    return distinct


def gemm_rows(eng):
    """Each distinct cuBLASLt call of one forward + backward, timed alone (graph replays) with its
    epilogue and as a plain product of the same shape (its operands, a scratch output)."""
    from bench_common import median_time

    original = eng.lt.matmul
    rows = []
    for (M, N, K, op, epi, _), (count, (out, a, b, kw)) in distinct_gemms(eng).items():
        ms = median_time(lambda s: original(out, a, b, **kw), 10, 10, eng.stream) * 1e3
        scratch = eng.cp.empty_like(out)
        plain = dict(trans_a=kw.get("trans_a", False), trans_b=kw.get("trans_b", False))
        plain_ms = median_time(lambda s: original(scratch, a, b, **plain), 10, 10, eng.stream) * 1e3
        rows.append({"M": M, "N": N, "K": K, "op": op, "epilogue": epi, "calls": count, "ms": ms,
                     "tflops": 2 * M * N * K / ms / 1e9, "plain_ms": plain_ms})
    return rows


if __name__ == "__main__":
    main()
