"""Where the Qwen3 GPU engine's bf16 prefill spends its time, by kernel group (CUDA events).

    python bench/profile_prefill.py --layers 8 --prompt 2048 --out bench/results/prefill_profile.json

Random 4-bit weights with Qwen3-32B's shapes (fewer layers: each layer costs the same). Every
launch of a group is bracketed by events on the engine's stream; the prefill is launched eagerly
and runs GPU-bound, so a group's events time its own kernels. GEMMs are split into the linear
layers' and attention's; TFLOP/s and GB/s are given where the group has a clear count.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import commit, copy_bandwidth, gpu_name, write_json  # noqa: E402

WRAPPED = {  # module -> launchers timed as their own group
    "koifish_cuda.quant": ("dequantize_bf16",),
    "koifish_cuda.bf16": ("to_bf16",),
    "koifish_cuda.swiglu": ("swiglu_bf16",),
    "koifish_cuda.rmsnorm": ("add_rmsnorm",),
    "koifish_cuda.rope": ("qk_norm_rope",),
    "koifish_cuda.attention_prefill": ("causal_softmax", "merge_heads", "kv_to_f16"),
}


class Timer:
    def __init__(self, stream):
        self.stream, self.marks, self.inside = stream, [], []

    @contextlib.contextmanager
    def group(self, name):
        import cupy as cp

        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record(self.stream)
        yield
        b.record(self.stream)
        self.marks.append((name, a, b))

    def wrap(self, name, fn):
        def timed(*args, **kw):
            with self.group(name):
                return fn(*args, **kw)
        return timed

    def wrap_modules(self, wrapped: dict) -> None:
        """Replace each launcher named in wrapped (module name -> names) by a timed one (a group each)."""
        import importlib

        for mod_name, names in wrapped.items():
            mod = importlib.import_module(mod_name)
            for n in names:
                setattr(mod, n, self.wrap(n, getattr(mod, n)))

    def totals(self) -> dict:
        import cupy as cp

        self.stream.synchronize()
        out: dict = {}
        for name, a, b in self.marks:
            out[name] = out.get(name, 0.0) + cp.cuda.get_elapsed_time(a, b) / 1e3
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--cprofile", action="store_true", help="also print where the host's time goes (cProfile)")
    ap.add_argument("--out", default="bench/results/prefill_profile.json")
    args = ap.parse_args()

    import numpy as np

    import koifish_cuda.attention_prefill as ap_mod
    from koifish_core.infer.qwen3_gpu import Qwen3GPU
    from koifish_core.models.qwen3 import Qwen3Config

    cfg = Qwen3Config(n_layer=args.layers)  # the defaults are Qwen3-32B's shapes
    eng = Qwen3GPU.random(cfg, bits=4)
    cache = eng.new_cache(1, args.prompt + 8)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.prompt))
    eng.forward(prompt, cache=cache, last_only=True)  # compiles every kernel
    eng.sync()
    cache = eng.new_cache(1, args.prompt + 8)
    eng.sync()
    t0 = time.perf_counter()
    eng._prefill(prompt, 0, all_logits=False)
    enqueue_s = time.perf_counter() - t0  # the host's launching alone (the GPU catches up after)
    eng.sync()
    plain_s = time.perf_counter() - t0
    if args.cprofile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        eng._prefill(prompt, 0, all_logits=False)
        prof.disable()
        eng.sync()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)

    timer = Timer(eng.stream)
    timer.wrap_modules(WRAPPED)
    attention = ap_mod.attention_prefill
    gemm = eng.blas.matmul
    state = {"in_attention": False}

    def attention_timed(*a, **k):
        state["in_attention"] = True
        try:
            return attention(*a, **k)
        finally:
            state["in_attention"] = False

    def gemm_timed(out, a, b, *rest, **kw):
        flops = 2 * np.prod(out.shape) * a.shape[-1]
        name = "gemm attention" if state["in_attention"] else "gemm linear"
        timer.flops = getattr(timer, "flops", {})
        timer.flops[name] = timer.flops.get(name, 0) + flops
        with timer.group(name):
            return gemm(out, a, b, *rest, **kw)

    ap_mod.attention_prefill = attention_timed
    eng.blas.matmul = gemm_timed
    cache = eng.new_cache(1, args.prompt + 8)
    t0 = time.perf_counter()
    eng.forward(prompt, cache=cache, last_only=True)
    eng.sync()
    timed_s = time.perf_counter() - t0
    totals = timer.totals()
    packed = sum(int(L[k].words.nbytes) for L in eng.layers for k in ("qkv", "o", "gu", "down"))
    copy = copy_bandwidth()
    rows = []
    print(f"Qwen3-32B shapes, {args.layers} layers, 4-bit, prompt {args.prompt} on {gpu_name()}: prefill "
          f"{plain_s * 1e3:.1f} ms ({args.prompt / plain_s:.0f} tokens/s; host launches {enqueue_s * 1e3:.1f} ms; "
          f"{timed_s * 1e3:.1f} ms with events)")
    print(f"{'group':<20}{'ms':>9}{'share':>8}  rate")
    for name, sec in sorted(totals.items(), key=lambda kv: -kv[1]):
        rate = ""
        if name in getattr(timer, "flops", {}):
            rate = f"{timer.flops[name] / sec / 1e12:.0f} TFLOP/s"
        elif name == "dequantize_bf16":  # packed weights read, bf16 written
            moved = 5 * packed  # the 4-bit codes read, four times their bytes written as bf16
            rate = f"{moved / sec / 1e9:.0f} GB/s ({moved / sec / copy:.0%} of copy)"
        rows.append({"group": name, "ms": sec * 1e3, "share": sec / timed_s})
        print(f"{name:<20}{sec * 1e3:>9.2f}{sec / timed_s:>8.0%}  {rate}")
    print(f"{'sum':<20}{sum(totals.values()) * 1e3:>9.2f}{sum(totals.values()) / timed_s:>8.0%}")
    write_json(args.out, {"gpu": gpu_name(), "commit": commit(), "layers": args.layers, "prompt": args.prompt,
                          "prefill_s": plain_s, "prefill_tokens_per_s": args.prompt / plain_s, "timed_s": timed_s,
                          "enqueue_s": enqueue_s,
                          "copy_GBps": copy / 1e9, "groups": rows})


if __name__ == "__main__":
    main()
