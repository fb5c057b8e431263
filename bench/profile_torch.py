"""Where PyTorch's training step goes, kernel by kernel: the reference of bench_train.py (compile, bf16
autocast, SDPA, fused AdamW, clipping) under torch.profiler, its GPU kernels grouped the way
profile_step.py groups koifish's, so the two tables can be read side by side.

    python bench/profile_torch.py --size 124M --batch 16 --out bench/profile_torch.json

The step is first timed without the profiler (CUDA events around `--steps` steps); then `--steps`
profiled steps give each kernel's GPU time a step. torch is a benchmark reference only.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import commit, gpu_name, write_json  # noqa: E402

# First match wins: inductor names its Triton kernels after the ops they fuse.
GROUPS = (
    ("attention (SDPA)", r"flash|fmha|cudnn|attention|sdpa"),
    ("GEMMs", r"gemm|nvjet|xmma|cutlass|sm90_|sm80_|ampere_|matmul|_mm_"),
    ("AdamW", r"adam"),
    ("layernorm", r"layer_norm|layernorm"),
    ("grad norm + clip", r"multi_tensor|foreach|lpnorm|norm_kernel|reduce_kernel"),
    ("classifier (softmax, cross-entropy)", r"softmax|nll|cross_entropy|logsumexp"),
    ("embedding", r"embedding"),
    ("gelu", r"gelu|tanh"),
    ("memset / copy", r"memset|memcpy|copy"),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, pattern in GROUPS:
        if re.search(pattern, low):
            return group
    return "triton, other" if "triton" in low else "other"


def main():
    import torch

    from bench_train import torch_step

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="124M")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=25, help="kernels listed by name")
    ap.add_argument("--out", default="bench/profile_torch.json")
    args = ap.parse_args()

    step, _ = torch_step(args.size, args.batch, args.seq)
    for _ in range(4):
        step()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(args.steps):
        step()
    b.record()
    b.synchronize()
    step_ms = a.elapsed_time(b) / args.steps

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    kernels: dict[str, list] = {}
    for e in prof.events():
        if not str(e.device_type).endswith("CUDA"):
            continue
        us = getattr(e, "device_time", None)
        us = e.cuda_time if us is None else us
        k = kernels.setdefault(e.name, [0.0, 0])
        k[0] += us / 1000 / args.steps
        k[1] += 1
    groups: dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + ms
    busy = sum(groups.values())
    rows = [{"group": g, "ms": ms, "share": ms / step_ms} for g, ms in sorted(groups.items(), key=lambda kv: -kv[1])]
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[: args.top]
    print(f"PyTorch {args.size} B={args.batch} T={args.seq}: step {step_ms:.2f} ms "
          f"({args.batch * args.seq / step_ms * 1000:,.0f} tokens/s), kernels busy {busy:.2f} ms a step")
    print(f"\n{'group':<38} {'ms/step':>8} {'share':>6}")
    for r in rows:
        print(f"{r['group']:<38} {r['ms']:>8.3f} {r['share']:>6.1%}")
    print(f"\n{'kernel (top by time)':<70} {'ms/step':>8} {'calls':>6}  group")
    for name, (ms, calls) in top:
        print(f"{name[:70]:<70} {ms:>8.3f} {calls // args.steps:>6}  {group_of(name)}")
    write_json(args.out, {"gpu": gpu_name(), "commit": commit(), "torch": torch.__version__, "size": args.size,
                          "batch": args.batch, "seq": args.seq, "step_ms": step_ms, "kernels_busy_ms": busy,
                          "rows": rows, "kernels": [{"name": n, "ms": ms, "calls": c // args.steps, "group": group_of(n)}
                                                    for n, (ms, c) in sorted(kernels.items(), key=lambda kv: -kv[1][0])]})


if __name__ == "__main__":
    main()
