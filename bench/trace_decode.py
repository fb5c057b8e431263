"""The captured decode step as the GPU runs it: each kernel's duration and the gaps between kernels (CUPTI).

    python bench/trace_decode.py --context 1024 --out bench/results/decode_trace.json

Random 4-bit weights with Qwen3-32B's shapes. The graph is replayed under torch.profiler, used here
only as a CUPTI reader (torch is a bench reference, never a koifish dependency): it records every
kernel of the process, so the replays' kernels come back with their start and end on the GPU clock.
Per kernel group: the time it runs, its count a step, and the idle time before it (from the end of
the kernel before it to its start), which is what launching costs inside a graph.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import apply_settings, commit, copy_bandwidth, gpu_kernels, gpu_name, parse_settings, write_json  # noqa: E402

GROUPS = (  # (group, pattern in the mangled kernel name), first match wins
    ("gemv w4a8", r"quant_a8.*kernel"),
    ("gemv", r"dequant_matvec"),
    ("rmsnorm", r"rmsnorm"),
    ("attention split", r"attention_decode.*_split"),
    ("attention merge", r"attention_decode"),
    ("qk_norm_rope", r"rope"),
    ("swiglu", r"swiglu"),
    ("embed", r"embed"),
    ("sampling", r"sampling"),
)


def group_of(name: str) -> str:
    for g, pat in GROUPS:
        if re.search(pat, name):
            return g
    return re.sub(r"\d+", "", name)[:40]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5, help="graph replays traced")
    ap.add_argument("--sweep", default="", help="engine settings traced in turn, as bench_qwen3_decode.py's")
    ap.add_argument("--out", default="bench/results/decode_trace.json")
    args = ap.parse_args()

    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from koifish_core.infer.qwen3_gpu import Qwen3GPU
    from koifish_core.infer.sampling import SamplingParams
    from koifish_core.models.qwen3 import Qwen3Config

    torch.cuda.init()
    cfg = Qwen3Config(n_layer=args.layers)
    eng = Qwen3GPU.random(cfg, bits=4, group_size=128, seed=0)
    cache = eng.new_cache(1, args.context + 64)
    eng.set_sampling(SamplingParams(temperature=0.6, top_k=20, top_p=0.95), seed=1)
    eng.prefill_sample(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 16)), cache)
    copy = copy_bandwidth()
    report = {"gpu": gpu_name(), "commit": commit(), "layers": args.layers, "context": args.context,
              "copy_GBps": copy / 1e9, "runs": []}
    for setting in parse_settings(args.sweep):
        label = apply_settings(eng, setting) or "defaults"
        for _ in range(3):  # eager (compiles), capture, one replay
            eng.seek(cache, args.context)
            eng.decode_sample(cache)
        eng.sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                eng.seek(cache, args.context)
                eng.decode_sample(cache)
            eng.sync()
        kern = sorted(k for k in gpu_kernels(prof) if "memcpy" not in k[2].lower() and "memset" not in k[2].lower())
        # steps: split where the embedding kernel starts
        starts = [i for i, (_, _, n) in enumerate(kern) if group_of(n) == "embed"]
        steps = [kern[a:b] for a, b in zip(starts, starts[1:] + [len(kern)])][-max(1, args.steps - 1):]
        groups: dict = {}
        span = busy = 0.0
        for st in steps:
            span += (st[-1][0] + st[-1][1] - st[0][0]) / len(steps)
            prev_end = None
            for s, d, n in st:
                g = groups.setdefault(group_of(n), {"count": 0, "run_us": 0.0, "gap_before_us": 0.0})
                g["count"] += 1 / len(steps)
                g["run_us"] += d / 1e3 / len(steps)
                busy += d / len(steps)
                if prev_end is not None:
                    g["gap_before_us"] += max(0, s - prev_end) / 1e3 / len(steps)
                prev_end = s + d
        gaps = span - busy
        print(f"{label}: step {span / 1e6:.3f} ms on the GPU clock, kernels running {busy / 1e6:.3f} ms, "
              f"idle between kernels {gaps / 1e6:.3f} ms ({len(steps[0])} kernels a step)")
        print(f"  {'group':<18}{'count':>7}{'run us':>10}{'per':>8}{'gap us':>10}{'per':>8}")
        for name, g in sorted(groups.items(), key=lambda kv: -kv[1]["run_us"] - kv[1]["gap_before_us"]):
            c = max(g["count"], 1e-9)
            print(f"  {name:<18}{g['count']:>7.0f}{g['run_us']:>10.1f}{g['run_us'] / c:>8.2f}"
                  f"{g['gap_before_us']:>10.1f}{g['gap_before_us'] / c:>8.2f}")
        report["runs"].append({"setting": label, "step_ms": span / 1e6, "kernels_ms": busy / 1e6,
                               "gaps_ms": gaps / 1e6, "kernels_a_step": len(steps[0]), "groups": groups})
    write_json(args.out, report)


if __name__ == "__main__":
    main()
