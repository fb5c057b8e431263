"""Where a training step's time goes: the CUDA engine's micro-batch graph (forward + backward)
re-captured with only one group of launches kept, each replay timed with CUDA events.

    python bench/profile_step.py --size 124M --batch 16 --out bench/profile.json

Groups: the cuBLASLt GEMMs, the attention (cuDNN's, or the cuBLAS path's batched GEMMs beside its
softmax and head copies) and each kernel module's launchers. Launches left
out are replaced by no-ops, so each row is the time of that group alone on the real buffers;
the rows add up to about the full graph (the remainder is launch gaps between kernels).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import commit, gpu_name, write_json  # noqa: E402

GROUPS = {
    "embedding": ("koifish_cuda.embedding", ("encoder_forward", "encoder_backward")),
    "layernorm": ("koifish_cuda.layernorm", ("layernorm_forward", "layernorm_backward")),
    "gelu": ("koifish_cuda.gelu", ("bias_gelu_forward", "gelu_backward")),
    "bias": ("koifish_cuda.matmul", ("add_bias", "bias_grad")),
    "residual": ("koifish_cuda.residual", ("residual_forward",)),
    "heads split/merge": ("koifish_cuda.attention", ("split_heads", "merge_heads")),
    "softmax causal": ("koifish_cuda.attention", ("softmax_causal_forward", "softmax_causal_backward")),
    "classifier": ("koifish_cuda.classifier", ("fused_classifier",)),
}


def replay_ms(eng, reps=10):
    import cupy as cp

    graph = eng.graphs.get("micro") or eng.graphs["micro_last"]  # one micro-batch a step: only the last
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

    import numpy as np

    from bench_train import SIZES

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="124M")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--compute", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--attention", default="auto", choices=("auto", "cudnn", "cublas"))
    ap.add_argument("--out", default="bench/profile.json")
    args = ap.parse_args()

    import koifish_cuda.compat  # noqa: F401
    from koifish_core.config.load import build_case
    from koifish_core.engine.cuda_gpt2 import CUDAEngine

    L, H, C = SIZES[args.size]
    B, T = args.batch, args.seq
    case = build_case({"model": {"n_layer": L, "n_head": H, "n_embd": C, "n_ctx": T},
                       "data": {"batch_size": B, "seq_len": T}, "train": {"device": "cuda"},
                       "precision": {"compute": args.compute}}, "profile")
    eng = CUDAEngine(case, attention=args.attention)
    rng = np.random.default_rng(0)
    eng.train_step([(rng.integers(0, 50257, (B, T)), rng.integers(0, 50257, (B, T)))], 1e-4)
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
    total = rows[0]["ms"]
    for r in rows:
        r["share"] = r["ms"] / total
    gpu = gpu_name()
    print(f"{args.size} B={B} T={T} {args.compute} attention {eng.attn.name} on {gpu}\n{'group':>24} {'ms':>8} {'share':>6}")
    for r in rows:
        print(f"{r['group']:>24} {r['ms']:>8.2f} {r['share']:>6.1%}")
    write_json(args.out, {"gpu": gpu, "commit": commit(), "size": args.size, "batch": B, "seq": T,
                          "compute": args.compute, "attention": eng.attn.name, "rows": rows})


if __name__ == "__main__":
    main()
