"""Where one decode step of the Qwen3 GPU engine spends its time, by kernel group (CUDA events).

    python bench/profile_decode.py --layers 16 --context 1024 --out bench/results/decode_profile.json

Random 4-bit weights with Qwen3-32B's shapes (fewer layers: each costs the same; the head is
whole). The step's body is launched eagerly behind a GPU kept busy by large GEMMs, so the whole
body is queued before its first kernel runs: the events around each group then time the GPU's
work back to back (launch gaps of a queued stream included), not the host's launching. The
captured graph replays the same kernels; its measured step time is printed beside the sum.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import commit, copy_bandwidth, gpu_name, write_json  # noqa: E402
from profile_prefill import Timer  # noqa: E402

WRAPPED = {  # module -> launchers timed as their own group
    "koifish_cuda.quant": ("dequant_matvec",),
    "koifish_cuda.quant_a8": ("dequant_matvec4_a8", "quantize_x16"),
    "koifish_cuda.rmsnorm": ("add_rmsnorm", "add_rmsnorm_x16"),
    "koifish_cuda.rope": ("qk_norm_rope",),
    "koifish_cuda.attention_decode": ("attention_decode",),
    "koifish_cuda.swiglu": ("swiglu", "swiglu_x16"),
    "koifish_cuda.sampling": ("sample", "advance"),
    "koifish_cuda.embedding_rows": ("embed_rows",),
}


def busy(cp, ms_wanted: float = 80.0):
    """Queue float32 GEMMs worth ~ms_wanted of GPU time (the host then queues the step behind them)."""
    a = cp.ones((8192, 8192), cp.float32)
    t = cp.cuda.Event(), cp.cuda.Event()
    t[0].record()
    a @ a
    t[1].record()
    t[1].synchronize()
    one = cp.cuda.get_elapsed_time(*t)
    for _ in range(max(1, int(ms_wanted / max(one, 1e-3)))):
        a @ a
    return a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--act-bits", type=int, default=8, choices=(8, 16), help="the 4-bit GEMVs' x (engine default 8)")
    ap.add_argument("--attention", default="mma", choices=("tiles", "warps", "mma"), help="the decode attention's kernel")
    ap.add_argument("--out", default="bench/results/decode_profile.json")
    args = ap.parse_args()

    import cupy as cp
    import numpy as np

    from koifish_core.infer.qwen3_gpu import Qwen3GPU
    from koifish_core.infer.sampling import SamplingParams
    from koifish_core.models.qwen3 import Qwen3Config

    cfg = Qwen3Config(n_layer=args.layers)  # the defaults are Qwen3-32B's shapes
    eng = Qwen3GPU.random(cfg, bits=4, act_bits=args.act_bits)
    eng.attention_variant = args.attention
    cache = eng.new_cache(1, args.context + 64)
    eng.set_sampling(SamplingParams(temperature=0.6, top_k=20, top_p=0.95), seed=1)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 16))
    eng.prefill_sample(prompt, cache)
    eng.decode_sample(cache)  # eager: compiles
    eng.decode_sample(cache)  # captures the graph
    eng.seek(cache, args.context)
    eng.sync()
    t0 = time.perf_counter()
    for _ in range(20):
        eng.decode_sample(cache)
    eng.sync()
    graph_s = (time.perf_counter() - t0) / 20

    timer = Timer(eng.stream)
    timer.wrap_modules(WRAPPED)
    sums: dict = {}
    for _ in range(args.reps):
        eng.seek(cache, args.context)
        timer.marks = []
        with eng.stream:
            hold = busy(cp)
            first, last = cp.cuda.Event(), cp.cuda.Event()
            first.record(eng.stream)
            eng._decode_body()
            last.record(eng.stream)
        totals = timer.totals()
        totals["(step, first to last event)"] = cp.cuda.get_elapsed_time(first, last) / 1e3
        for k, v in totals.items():
            sums[k] = sums.get(k, 0.0) + v / args.reps
        del hold
    step = sums.pop("(step, first to last event)")
    copy = copy_bandwidth()
    gemv_bytes = sum(int(L[k].words.nbytes + L[k].scales.nbytes + L[k].zeros.nbytes)
                     for L in eng.layers for k in ("qkv", "o", "gu", "down"))
    gemv_bytes += int(eng.head.words.nbytes + eng.head.scales.nbytes + eng.head.zeros.nbytes)
    rows = []
    print(f"Qwen3-32B shapes, {args.layers} layers, 4-bit, context {args.context} on {gpu_name()}: graph step "
          f"{graph_s * 1e3:.2f} ms; eager step on a queued stream {step * 1e3:.2f} ms; copy {copy / 1e9:.0f} GB/s")
    print(f"{'group':<20}{'ms':>9}{'share':>8}  rate")
    for name, sec in sorted(sums.items(), key=lambda kv: -kv[1]):
        rate = ""
        if name in ("dequant_matvec", "dequant_matvec4_a8"):
            rate = f"{gemv_bytes / sec / 1e9:.0f} GB/s ({gemv_bytes / sec / copy:.0%} of copy)"
        rows.append({"group": name, "ms": sec * 1e3, "share": sec / step})
        print(f"{name:<20}{sec * 1e3:>9.3f}{sec / step:>8.0%}  {rate}")
    rest = step - sum(sums.values())
    print(f"{'(between groups)':<20}{rest * 1e3:>9.3f}{rest / step:>8.0%}")
    write_json(args.out, {"gpu": gpu_name(), "commit": commit(), "layers": args.layers, "context": args.context,
                          "act_bits": args.act_bits, "attention": args.attention,
                          "graph_step_s": graph_s, "queued_step_s": step, "copy_GBps": copy / 1e9,
                          "gemv_bytes": gemv_bytes, "groups": rows, "between_groups_ms": rest * 1e3})


if __name__ == "__main__":
    main()
