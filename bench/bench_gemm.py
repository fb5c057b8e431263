"""The training engine's GEMMs, each timed five ways on the same operands in one process, by GPU kernel
time (torch.profiler's CUPTI records, what a call costs inside a CUDA graph): as the engine makes it
(epilogue, C), koifish's cuBLASLt plain into the engine's output type and into bf16, cuBLAS's GemmEx
(the library's own choice) and PyTorch's torch.mm (into bf16, its operands' type), with the kernels
each ran.

    python bench/bench_gemm.py --size 124M --batch 16 --out bench/gemm.json

The calls are recorded from one forward + backward of the engine (as profile_step's GEMM table), so
the shapes, transposes, output types and epilogues are the engine's. torch is a benchmark reference only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import commit, engine_options, gpu_kernels, gpu_name, write_json  # noqa: E402


def loaded(fragment: str) -> list[str]:
    """Shared libraries of this process whose path contains fragment (which cuBLAS each side uses)."""
    with open("/proc/self/maps") as f:
        return sorted({line.split()[-1] for line in f if fragment in line})


def kernel_time(fn, reps: int = 20) -> tuple[float, list[str]]:
    """(ms of GPU kernel time a call, the kernels one call runs) from torch.profiler (CUPTI): what a call
    costs inside a CUDA graph, without the launch gaps that event timing of single calls adds."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):  # first calls tune a new plan
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels = gpu_kernels(prof)
    return sum(d for _, d, _ in kernels) / 1e6 / reps, list(dict.fromkeys(n for _, _, n in kernels))


def main():
    import numpy as np
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="124M")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    engine_options(ap)
    ap.add_argument("--out", default="bench/gemm.json")
    args = ap.parse_args()

    from bench_train import koifish_step
    from koifish_cuda.cublas_raw import Cublas
    from profile_step import distinct_gemms

    step, eng, _ = koifish_step(args.size, args.batch, args.seq, options=args)
    step()  # tunes every GEMM's algorithm as the engine would
    cp, original = eng.cp, eng.lt.matmul
    blas = Cublas(eng.stream)
    distinct = distinct_gemms(eng)

    def as_torch(x):
        t = torch.from_dlpack(x)
        return t.view(torch.bfloat16) if x.dtype == np.uint16 else t

    rows = []
    cols = ("engine", "lt", "lt_bf16", "gemm_ex", "torch")
    print(f"libcublasLt loaded: {loaded('cublasLt')}\nGPU kernel ms a call (CUPTI): engine = the call as the engine "
          f"makes it (epilogue, C); lt = cuBLASLt plain into the engine's output type; lt_bf16 = into bf16; "
          f"gemm_ex = cuBLAS GemmEx plain; torch = torch.mm into bf16")
    print(f"{'M':>6} {'N':>6} {'K':>6} {'op':>2} {'epilogue':>14} {'out':>7} {'n':>3}" + "".join(f"{c:>8}" for c in cols)
          + "  kernels engine / lt_bf16 / torch")
    for (M, N, K, op, epi, odt), (count, (out, a, b, kw)) in distinct.items():
        ta, tb = kw.get("trans_a", False), kw.get("trans_b", False)
        scratch, scratch16 = cp.empty_like(out), cp.empty(out.shape, dtype=a.dtype)
        at, bt, ot = as_torch(a), as_torch(b), as_torch(scratch16)
        at, bt = (at.t() if ta else at), (bt.t() if tb else bt)
        fns = {"engine": lambda: original(out, a, b, **kw),
               "lt": lambda: original(scratch, a, b, trans_a=ta, trans_b=tb),
               "lt_bf16": lambda: original(scratch16, a, b, trans_a=ta, trans_b=tb),
               "gemm_ex": lambda: blas.gemm(scratch, a, b, trans_a=ta, trans_b=tb),
               "torch": lambda: torch.mm(at, bt, out=ot)}
        timed = {k: kernel_time(f) for k, f in fns.items()}
        row = {"M": M, "N": N, "K": K, "op": op, "epilogue": epi, "out": odt, "calls": count,
               **{k + "_ms": v[0] for k, v in timed.items()}, "kernels": {k: v[1] for k, v in timed.items()}}
        rows.append(row)
        short = lambda ns: "+".join(n.split("(")[0][:40] for n in ns if not n.startswith("Memset"))  # noqa: E731
        print(f"{M:>6} {N:>6} {K:>6} {op:>2} {epi:>14} {odt:>7} {count:>3}" + "".join(f"{row[c + '_ms']:>8.3f}" for c in cols)
              + f"  {short(timed['engine'][1])} / {short(timed['lt_bf16'][1])} / {short(timed['torch'][1])}", flush=True)
    total = {k: sum(r[k + "_ms"] * r["calls"] for r in rows) for k in cols}
    print("a micro-batch's GEMMs, ms: " + ", ".join(f"{k} {v:.2f}" for k, v in total.items()))
    write_json(args.out, {"gpu": gpu_name(), "commit": commit(), "torch": torch.__version__, "size": args.size,
                          "batch": args.batch, "seq": args.seq, "tune": args.tune, "cublaslt": loaded("cublasLt"),
                          "totals_ms": total, "rows": rows})


if __name__ == "__main__":
    main()
