"""Where a training step's GPU time goes, kernel by kernel, for koifish and PyTorch alike: each
framework's step (bench_train.py's: koifish's CUDA engine; PyTorch with compile, bf16 autocast, SDPA,
fused AdamW, clipping) under torch.profiler, which records every kernel of the process through CUPTI
(koifish's inside its CUDA graphs too). Both are grouped by kernel name the same way, so the two
tables read side by side.

    python bench/profile_kernels.py --size 124M --batch 16 --frameworks koifish,torch --out bench/kernels_step.json

Each framework runs in its own process after warm-up: `--steps` steps timed (wall clock, synchronized), then
`--steps` profiled steps give each kernel's GPU time a step. torch is a benchmark reference only.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import child_result, commit, engine_flags, engine_options, gpu_kernels, gpu_name, write_json  # noqa: E402

# First match wins. Inductor names its Triton kernels after the ops they fuse; Numba's mangled names
# carry koifish's module and function names.
GROUPS = (
    ("bias gradients", r"bias_grad"),
    ("attention", r"flash|fmha|cudnn|attention|sdpa"),
    ("GEMMs", r"gemm|nvjet|xmma|cutlass|splitkreduce"),
    ("grad norm", r"sum_squares|lpnorm"),
    ("instability statistics", r"update_stats"),
    ("AdamW", r"adam"),
    ("grad norm", r"multi_tensor|foreach|reduce_kernel"),
    ("layernorm", r"layer_norm|layernorm"),
    ("classifier (softmax, cross-entropy)", r"classifier|softmax|nll|cross_entropy|logsumexp"),
    ("embedding", r"embedding|encoder"),
    ("gelu", r"gelu|tanh"),
    ("memset / copy", r"memset|memcpy|copy"),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, pattern in GROUPS:
        if re.search(pattern, low):
            return group
    return "triton, other" if "triton" in low else "other"


def profile_step(fw: str, size: str, B: int, T: int, steps: int, options=None) -> dict:
    """One framework's step timed (wall clock, no profiler) and profiled: kernel name -> [ms a step, calls a step].
    options: koifish's engine_options flags (bench_common)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench_train import koifish_step, torch_step

    step = koifish_step(size, B, T, options=options)[0] if fw == "koifish" else torch_step(size, B, T)[0]
    for _ in range(4):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) * 1e3 / steps  # wall time, as bench_train's (koifish's stream is not torch's)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels: dict[str, list] = {}
    spans = gpu_kernels(prof)
    for _, ns, name in spans:
        k = kernels.setdefault(name, [0.0, 0])
        k[0] += ns / 1e6 / steps
        k[1] += 1 / steps
    return {"step_ms": step_ms, "kernels": kernels, "idle": idle_gaps(spans, steps),
            "memsets": memset_followers(spans, steps)}


GAP_BINS = ((0, 3), (3, 20), (20, 200), (200, float("inf")))  # microseconds


def idle_gaps(spans, steps: int, top: int = 8) -> dict:
    """Where the GPU ran no kernel, from the profiled kernels' (start ns, duration ns, name): idle ms a step
    in gaps of each size (GAP_BINS; the small ones are launch latency between kernels, the large ones the
    host's stalls) and the largest gaps (us) with the kernels around them."""
    gaps, end, last = [], None, ""
    for start, stop, name in sorted((s / 1e3, (s + d) / 1e3, n) for s, d, n in spans):  # microseconds
        if end is not None and start > end:
            gaps.append((start - end, last, name))
        if end is None or stop > end:
            end, last = stop, name
    bins = [{"us": f"{lo:g}-{hi:g}", "gaps": sum(lo <= g < hi for g, _, _ in gaps) / steps,
             "ms": sum(g for g, _, _ in gaps if lo <= g < hi) / 1000 / steps} for lo, hi in GAP_BINS]
    largest = [{"us": g, "after": a[:60], "before": b[:60]} for g, a, b in sorted(gaps, reverse=True)[:top]]
    return {"ms": sum(g for g, _, _ in gaps) / 1000 / steps, "bins": bins, "largest": largest}


def memset_followers(spans, steps: int, top: int = 8) -> list[dict]:
    """The memsets of a step (libraries insert them: cuBLASLt's workspace flags, cuDNN's accumulators) by the
    kernel that runs next: which calls bring them, each a node of its own in a CUDA graph."""
    order = sorted(spans)
    counts: dict[str, list] = {}
    for i, (_, ns, name) in enumerate(order):
        if not name.startswith("Memset"):
            continue
        after = next((n for _, _, n in order[i + 1:] if not n.startswith("Memset")), "(none)")
        c = counts.setdefault(after[:70], [0.0, 0.0])
        c[0] += 1 / steps
        c[1] += ns / 1e6 / steps
    return [{"before": k, "per_step": n, "ms": ms} for k, (n, ms) in sorted(counts.items(), key=lambda kv: -kv[1][0])[:top]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="124M")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--frameworks", default="koifish,torch")
    ap.add_argument("--top", type=int, default=20, help="kernels listed by name, per framework")
    ap.add_argument("--out", default="bench/kernels_step.json")
    engine_options(ap)  # koifish's
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(profile_step(args.child, args.size, args.batch, args.seq, args.steps, args)),
              flush=True)
        return
    results = {}
    for fw in args.frameworks.split(","):
        res = child_result([sys.executable, __file__, "--child", fw, "--size", args.size, "--batch", str(args.batch),
                            "--seq", str(args.seq), "--steps", str(args.steps)] + engine_flags(args), tail=3000)
        if "error" in res:
            raise SystemExit(f"{fw} failed:\n{res['error']}")
        results[fw] = res
    fws = list(results)
    groups = {fw: {} for fw in fws}
    for fw in fws:
        for name, (ms, _) in results[fw]["kernels"].items():
            groups[fw][group_of(name)] = groups[fw].get(group_of(name), 0.0) + ms
    print(f"{args.size} B={args.batch} T={args.seq}, ms a step (kernel time from CUPTI; step: wall clock)")
    print(f"{'group':<38}" + "".join(f"{fw:>10}" for fw in fws))
    order = sorted({g for fw in fws for g in groups[fw]}, key=lambda g: -max(groups[fw].get(g, 0) for fw in fws))
    for g in order:
        print(f"{g:<38}" + "".join(f"{groups[fw].get(g, 0.0):>10.3f}" for fw in fws))
    print(f"{'kernels busy':<38}" + "".join(f"{sum(groups[fw].values()):>10.3f}" for fw in fws))
    for i, (lo, hi) in enumerate(GAP_BINS):
        print(f"{f'idle in gaps of {lo:g}-{hi:g} us (count)':<38}" + "".join(
            f"{results[fw]['idle']['bins'][i]['ms']:>6.3f}{results[fw]['idle']['bins'][i]['gaps']:>4.0f}" for fw in fws))
    print(f"{'step':<38}" + "".join(f"{results[fw]['step_ms']:>10.3f}" for fw in fws))
    print(f"{'tokens/s':<38}" + "".join(f"{args.batch * args.seq / results[fw]['step_ms'] * 1e3:>10,.0f}" for fw in fws))
    for fw in fws:
        print(f"\n{fw}: largest idle gaps (us, the kernels around them)")
        for g in results[fw]["idle"]["largest"]:
            print(f"  {g['us']:>8.1f}  after {g['after']}  before {g['before']}")
    for fw in fws:
        print(f"\n{fw}: memsets a step, by the kernel after them")
        for m in results[fw]["memsets"]:
            print(f"  {m['per_step']:>6.1f} {m['ms']:>7.3f} ms  before {m['before']}")
    for fw in fws:
        print(f"\n{fw}: {'kernel (top by time)':<66} {'ms':>7} {'calls':>5}  group")
        for name, (ms, calls) in sorted(results[fw]["kernels"].items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"  {name[:74]:<74} {ms:>7.3f} {calls:>5.0f}  {group_of(name)}")
    write_json(args.out, {"gpu": gpu_name(), "commit": commit(), "koifish_flags": engine_flags(args), "size": args.size,
                          "batch": args.batch,
                          "seq": args.seq, "steps": args.steps,
                          **{fw: {"step_ms": results[fw]["step_ms"], "groups": groups[fw], "idle": results[fw]["idle"],
                                  "memsets": results[fw]["memsets"],
                                  "kernels": [{"name": n, "ms": ms, "calls": c, "group": group_of(n)} for n, (ms, c) in
                                              sorted(results[fw]["kernels"].items(), key=lambda kv: -kv[1][0])]}
                             for fw in fws}})


if __name__ == "__main__":
    main()
