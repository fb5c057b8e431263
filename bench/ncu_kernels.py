"""The kernels worth a hardware-counter look, each launched once on data past L2, for Nsight Compute (ncu).

    ncu --clock-control none --kernel-name regex:kernel \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \\
        --section SchedulerStats --section LaunchStats --csv --page details \\
        --metrics regex:'smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio' \\
        python bench/ncu_kernels.py > ncu.csv
    python bench/ncu_kernels.py --summary ncu.csv        (a table of the metrics that matter, a row a kernel)

Which kernels (the ones the issues' numbers wait on, stop 17): the W4A8 GEMV on the decode engine's five
shapes (51-79% of the 4.45 TB/s this H200 reads, bench_quant_gemv.py --cold), the mma decode attention at
8k keys (split + merge), the decode RMSNorm, and the training engine's LayerNorm backward, bf16 classifier
and sum of squares at GPT-2 124M's shapes (68-74%, 63%, 70% of copy). ncu replays each launch with its
caches flushed, so every one reads from memory as in a decode or training step. ncu works on the
`nvidia-h200` machines (Firecracker); --clock-control none leaves the clocks as a normal run has them.
The script alone (no ncu) runs each kernel once and says what it launched.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys

import numpy as np

import koifish_cuda.compat  # noqa: F401

KEEP = ("Duration", "DRAM Throughput", "Memory Throughput", "L1/TEX Hit Rate", "L2 Hit Rate",
        "Achieved Occupancy", "Theoretical Occupancy", "Registers Per Thread", "Block Size", "Grid Size",
        "Warp Cycles Per Issued Instruction", "Issue Slots Busy", "No Eligible", "Active Warps Per Scheduler",
        "Eligible Warps Per Scheduler", "Mem Busy", "Max Bandwidth")
STALL = "smsp__average_warps_issue_stalled_"


def short(name: str) -> str:
    """ncu names a kernel by its function: the factories' closures are all `kernel`, so the first
    argument types tell them apart (with the grid, and the script's launch order on stderr)."""
    name = re.sub(r"\[[^]]*\]", "", name)  # numba's specialisation hash
    name = re.sub(r"Array<([^,]+), (\d), [^>]*>", r"\1[\2]", name)
    return name[:90]


def summary(path: str) -> None:
    """One row a profiled launch: its kernel, grid and the KEEP metrics ncu's details page gave."""
    rows: dict = {}
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]  # ncu's own messages are not CSV
    for rec in csv.DictReader(lines):
        r = rows.setdefault(rec["ID"], {"kernel": short(rec["Kernel Name"]), "grid": rec.get("Grid Size", ""),
                                        "block": rec.get("Block Size", "")})
        name = rec["Metric Name"]
        if any(name.startswith(k) for k in KEEP):
            r[name] = f"{rec['Metric Value']} {rec['Metric Unit']}".strip()
        elif name.startswith(STALL):  # cycles a warp waits per issued instruction, by reason
            r.setdefault("stalls", {})[name[len(STALL):].split("_per_issue")[0]] = float(
                rec["Metric Value"].replace(",", "") or 0)
    for i, r in rows.items():
        print(f"[{i}] {r.pop('kernel')}  grid {r.pop('grid')}  block {r.pop('block')}")
        stalls = r.pop("stalls", {})
        for k, v in r.items():
            print(f"      {k:<44} {v}")
        top = sorted(stalls.items(), key=lambda kv: -kv[1])[:6]
        if top:
            print("      stalls (cycles an issue): " + ", ".join(f"{k} {v:.2f}" for k, v in top))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--summary", metavar="CSV", help="print the metrics that matter from ncu's --csv output")
    ap.add_argument("--only", choices=("decode", "training"), default=None, help="one engine's kernels")
    args = ap.parse_args()
    if args.summary:
        return summary(args.summary)

    import cupy as cp

    rng = np.random.default_rng(0)

    def f32(*shape):
        return cp.asarray(rng.standard_normal(shape, dtype=np.float32))

    def launched(what):
        cp.cuda.Device().synchronize()
        print(f"launched: {what}", file=sys.stderr, flush=True)

    if args.only != "training":
        decode_kernels(rng, f32, launched)
    if args.only != "decode":
        training_kernels(rng, f32, launched)


def decode_kernels(rng, f32, launched) -> None:
    """Qwen3-32B shapes, batch 1: the decode engine's five matrices, as bench_quant_gemv --cold times them."""
    import cupy as cp

    from koifish_cuda.attention_decode import attention_decode, attention_scratch
    from koifish_cuda.quant_a8 import dequant_matvec4_a8, quantize_x16
    from koifish_cuda.rmsnorm import add_rmsnorm_x16
    from koifish_cuda.rope import rope_tables
    from bench_quant_gemv import ENGINE, HEAD_DIM as hd, HEADS as heads, HIDDEN as hidden, KV as kv

    group = 128
    for name, (N, K) in ENGINE.items():
        words = cp.asarray(rng.integers(0, 2**32, (N, K // 8), dtype=np.uint32))
        scales = cp.asarray(rng.random((N, K // group), dtype=np.float32) * 0.01 + 0.001)
        zeros = cp.asarray(rng.integers(0, 16, (N, K // group), dtype=np.uint8))
        xq = (cp.empty(K // 4, cp.uint32), cp.empty(K // 16, cp.float32), cp.empty(K // 16, cp.int32))
        quantize_x16(f32(1, K), *xq)
        out = cp.empty((1, N), cp.float32)
        dequant_matvec4_a8(out, xq, words, scales, zeros, group)
        launched(f"gemv w4a8 {name} {N} x {K}")
    ctx, max_len = 8192, 8192 + 64
    kc = cp.asarray(rng.standard_normal((1, kv, max_len, hd), dtype=np.float32)).astype(cp.float16)
    vc = kc.copy()
    cos, sin = (cp.asarray(a) for a in rope_tables(max_len, hd, 1e6))
    qkv, att = f32(1, (heads + 2 * kv) * hd), cp.zeros((1, heads * hd), cp.float32)
    pos = cp.asarray([ctx - 1], np.int32)
    attention_decode(att, qkv, kc, vc, pos, 1, attention_scratch(cp, 1, heads, hd, 32), variant="mma",
                     rope=(f32(hd), f32(hd), cos, sin, 1e-6))
    launched(f"attention mma, {ctx} keys, fused rope, 32 splits (split + merge)")
    xq = (cp.empty(hidden // 4, cp.uint32), cp.empty(hidden // 16, cp.float32), cp.empty(hidden // 16, cp.int32))
    add_rmsnorm_x16(f32(1, hidden), xq, f32(1, hidden), f32(1, hidden), f32(hidden), 1e-6)
    launched("rmsnorm x16 1 x 5120")


def training_kernels(rng, f32, launched) -> None:
    """GPT-2 124M, B=16, T=1024, as cases/gpt2_124M.json runs them: bf16 compute, residual stream and its
    gradient in bf16, the engine's kernel variants."""
    import cupy as cp

    from koifish_cuda.adamw import sum_squares
    from koifish_cuda.classifier import fused_classifier
    from koifish_cuda.layernorm import layernorm_backward, layernorm_forward
    from koifish_cuda.matmul import bias_grad

    N, C, V, Vp = 16384, 768, 50257, 50304

    def bf16(*shape):
        return (f32(*shape).view(cp.uint32) >> 16).astype(cp.uint16)

    x, w, b, mean, rstd = bf16(N, C), f32(C), f32(C), f32(N), cp.abs(f32(N))
    layernorm_forward(bf16(N, C), mean, rstd, x, w, b)
    launched(f"layernorm forward {N} x {C}, bf16 in and out")
    layernorm_backward(bf16(N, C), f32(C), f32(C), bf16(N, C), x, w, mean, rstd, dsum=f32(C))
    launched(f"layernorm backward {N} x {C}, bf16 residual gradient in place, projection bias sums")
    bias_grad(f32(4 * C), bf16(N, 4 * C), vector=True)
    launched(f"bias gradient {N} x {4 * C} bf16")
    rows = 4096  # the engine's LM-head chunk at B=16
    logits = bf16(rows, Vp)
    fused_classifier(logits, cp.zeros(rows, cp.float32), cp.zeros(1, cp.float32),
                     cp.asarray(rng.integers(0, V, rows), np.int32), V, 1.0 / rows, variant="stream")
    launched(f"classifier bf16 {rows} x {Vp}, stream")
    sum_squares(cp.zeros(1, cp.float32), f32(124_475_904))
    launched("sum_squares 124M")


if __name__ == "__main__":
    main()
