"""The training engine's GEMMs, each timed three ways on the same operands in one process: koifish's
cuBLASLt plan (the algorithm it tunes), cuBLAS's GemmEx (the library's own choice, as torch.mm
makes it), and PyTorch (torch.mm / addmm on the same memory), with the kernel each one ran.

    python bench/bench_gemm.py --size 124M --batch 16 --out bench/gemm.json

The calls are recorded from one forward + backward of the engine (as profile_step's GEMM table), so
the shapes, transposes, output types and epilogues are the engine's. Epilogue columns time the call
as the engine makes it; the other columns the plain product into a scratch output of the same type
(PyTorch's into bf16: its mm gives the operands' type). Kernel names come from torch.profiler, which
sees every kernel of the process (CUPTI). torch is a benchmark reference only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import commit, gpu_name, median_time, write_json  # noqa: E402


def loaded(fragment: str) -> list[str]:
    """Shared libraries of this process whose path contains fragment (which cuBLAS each side uses)."""
    with open("/proc/self/maps") as f:
        return sorted({line.split()[-1] for line in f if fragment in line})


def kernel_names(fn) -> list[str]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if str(e.device_type).endswith("CUDA")]


def torch_time(fn, reps=5, per=20) -> float:
    """Median seconds of one fn() from CUDA events around `per` back-to-back calls (torch's launches,
    ~10 us, stay ahead of GEMMs this long; no graph capture, which torch's cuBLAS may refuse)."""
    import torch

    fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(torch.cuda.current_stream())
        for _ in range(per):
            fn()
        b.record(torch.cuda.current_stream())
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / per)
    return sorted(times)[reps // 2]


def main():
    import numpy as np
    import torch

    from bench_train import SIZES

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="124M")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--tune", type=int, default=8, help="cuBLASLt candidates koifish times per shape")
    ap.add_argument("--out", default="bench/gemm.json")
    args = ap.parse_args()

    import koifish_cuda.compat  # noqa: F401
    from koifish_core.config.load import build_case
    from koifish_core.engine.cuda_gpt2 import CUDAEngine
    from koifish_cuda.cublas_raw import Cublas

    L, H, C = SIZES[args.size]
    B, T = args.batch, args.seq
    case = build_case({"model": {"n_layer": L, "n_head": H, "n_embd": C, "n_ctx": T},
                       "data": {"batch_size": B, "seq_len": T}, "train": {"device": "cuda"},
                       "precision": {"compute": "bf16"}}, "gemm")
    eng = CUDAEngine(case)
    eng.lt.tune = args.tune
    rng = np.random.default_rng(0)
    eng.train_step([(rng.integers(0, 50257, (B, T)), rng.integers(0, 50257, (B, T)))], 1e-4)
    cp, lt = eng.cp, eng.lt
    blas = Cublas(eng.stream)

    calls, original = [], lt.matmul

    def record(out, a, b, **kw):
        calls.append((out, a, b, kw))
        return original(out, a, b, **kw)

    lt.matmul = record
    with eng.stream:
        eng._forward(1.0 / eng.N, backward=True)
        eng._backward()
        eng.stream.synchronize()
    lt.matmul = original
    distinct = {}
    for out, a, b, kw in calls:
        ta, tb = kw.get("trans_a", False), kw.get("trans_b", False)
        key = (*out.shape, a.shape[0] if ta else a.shape[1], ("T" if ta else "N") + ("T" if tb else "N"),
               kw.get("epilogue", "default") + ("+c" if kw.get("c") is not None else ""), out.dtype.name)
        distinct.setdefault(key, [0, (out, a, b, kw)])[0] += 1

    def as_torch(x):
        t = torch.from_dlpack(x)
        return t.view(torch.bfloat16) if x.dtype == np.uint16 else t

    rows = []
    print(f"libcublasLt loaded: {loaded('cublasLt')}")
    print(f"{'M':>6} {'N':>6} {'K':>6} {'op':>2} {'epilogue':>14} {'out':>7} {'n':>3} {'lt epi':>7} {'lt':>7} "
          f"{'gemmEx':>7} {'torch':>7}  ms; kernels lt / gemmEx / torch")
    for (M, N, K, op, epi, odt), (count, (out, a, b, kw)) in distinct.items():
        ta, tb = kw.get("trans_a", False), kw.get("trans_b", False)
        scratch, scratch16 = cp.empty_like(out), cp.empty(out.shape, dtype=a.dtype)
        at, bt, ot = as_torch(a), as_torch(b), as_torch(scratch16)
        at, bt = (at.t() if ta else at), (bt.t() if tb else bt)

        def run_lt(s=None):
            original(scratch, a, b, trans_a=ta, trans_b=tb)

        def run_ex(s=None):
            blas.gemm(scratch, a, b, trans_a=ta, trans_b=tb)

        def run_torch(s=None):
            torch.mm(at, bt, out=ot)

        t = {"lt_epilogue": median_time(lambda s: original(out, a, b, **kw), 10, 10, eng.stream),
             "lt": median_time(run_lt, 10, 10, eng.stream), "gemm_ex": median_time(run_ex, 10, 10, eng.stream),
             "torch": torch_time(run_torch)}
        names = {k: kernel_names(f) for k, f in (("lt", run_lt), ("gemm_ex", run_ex), ("torch", run_torch))}
        row = {"M": M, "N": N, "K": K, "op": op, "epilogue": epi, "out": odt, "calls": count,
               **{k + "_ms": v * 1e3 for k, v in t.items()}, "kernels": names}
        rows.append(row)
        short = lambda ns: "+".join(n.split("(")[0][:44] for n in ns)  # noqa: E731
        print(f"{M:>6} {N:>6} {K:>6} {op:>2} {epi:>14} {odt:>7} {count:>3} {row['lt_epilogue_ms']:>7.3f} "
              f"{row['lt_ms']:>7.3f} {row['gemm_ex_ms']:>7.3f} {row['torch_ms']:>7.3f}  "
              f"{short(names['lt'])} / {short(names['gemm_ex'])} / {short(names['torch'])}", flush=True)
    total = {k: sum(r[k + "_ms"] * r["calls"] for r in rows) for k in ("lt_epilogue", "lt", "gemm_ex", "torch")}
    print("a micro-batch's GEMMs, ms: " + ", ".join(f"{k} {v:.2f}" for k, v in total.items()))
    write_json(args.out, {"gpu": gpu_name(), "commit": commit(), "torch": torch.__version__, "size": args.size,
                          "batch": B, "seq": T, "tune": args.tune, "cublaslt": loaded("cublasLt"),
                          "totals_ms": total, "rows": rows})


if __name__ == "__main__":
    main()
