"""Qwen3 decode and prefill on the GPU engine, random weights with Qwen3-32B's exact shapes.

    python bench/bench_qwen3_decode.py --out bench/results/qwen3_decode.json [--layers 64] [--bits 4] [--kv-bits 8]

Weights are made on the GPU (koifish_core.infer.qwen3_gpu.Qwen3GPU.random): every linear layer,
the embedding and the head at `bits` (group 128). Measures, in one run:
    copy bandwidth   a 1 GiB device-to-device copy (read + write bytes / time)
    prefill          tokens/s of a --prompt token prompt (bf16 GEMMs through cuBLAS GemmEx, eager launches)
    decode           tokens/s at batch 1 (one CUDA-graph replay + a 4-byte read per token), at the
                     context after the prompt and at each --contexts length (the cache is filled
                     to that length without computing it: the attention reads the same bytes)
    roofline         bytes one token reads (weights + the KV cache at that length) / copy bandwidth
    memory           peak device memory in use (cudaMemGetInfo, sampled after each phase) and the
                     CuPy pool (weights, cache, buffers); --kv-bits 8 keeps the KV cache as int8 codes
                     and a float32 scale per head vector (about half the bytes of float16)
    reference        with --torch-prefill: transformers' Qwen3ForCausalLM (bf16, SDPA, random
                     weights, same shapes) prefilling a prompt of the same length, in a subprocess
                     run first (torch is a benchmark reference only, never a koifish dependency)
--layers N keeps Qwen3-32B's widths with fewer layers (quick runs); tokens/s then scale ~64/N.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench.` imports when run as a script

import koifish_cuda.compat  # noqa: F401


def torch_prefill(layers: int, prompt: int, reps: int = 3, device: str = "cuda") -> dict:
    """transformers' bf16 prefill of `prompt` tokens with Qwen3-32B's shapes (random weights)."""
    import torch
    from transformers import Qwen3Config as HFConfig
    from transformers import Qwen3ForCausalLM

    cfg = HFConfig(hidden_size=5120, intermediate_size=25600, num_hidden_layers=layers, num_attention_heads=64,
                   num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
                   rope_theta=1e6, max_position_embeddings=40960, attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)
    t0 = time.perf_counter()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).eval()
    sync()
    build_s = time.perf_counter() - t0
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), device=device)
    times = []
    with torch.no_grad():
        for i in range(reps + 1):
            sync()
            t = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1)
            sync()
            if i:  # the first call warms up
                times.append(time.perf_counter() - t)
    best = sorted(times)[len(times) // 2]
    return {"framework": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, bf16, sdpa",
            "prefill_tokens": prompt, "prefill_s": best, "prefill_tokens_per_s": prompt / best, "build_s": build_s,
            "peak_GB": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None}


def main():
    if "--torch-child" in sys.argv:  # the reference, in its own process so the GPU is all its own
        layers, prompt = int(sys.argv[-2]), int(sys.argv[-1])
        print("RESULT " + json.dumps(torch_prefill(layers, prompt)), flush=True)
        return
    import cupy as cp

    from bench.bench_common import apply_settings, commit, copy_bandwidth, parse_settings
    from koifish_core.infer.qwen3_gpu import Qwen3GPU, kv_cache_dtype
    from koifish_core.infer.sampling import SamplingParams
    from koifish_core.models.qwen3 import Qwen3Config

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--kv-bits", type=int, default=16, choices=(16, 8), help="KV cache: float16, or int8 + scales")
    ap.add_argument("--act-bits", type=int, default=8, choices=(16, 8),
                    help="the 4-bit GEMVs' x: int8 per 16 values (dp4a; the engine's default), or float32")
    ap.add_argument("--attention", default="mma", choices=("tiles", "warps", "mma"),
                    help="the decode attention's split kernel (koifish_cuda.attention_decode)")
    ap.add_argument("--unfused-rope", action="store_true",
                    help="q/k norm and RoPE as a kernel of their own, not inside the mma attention kernel")
    ap.add_argument("--prefetch-mb", type=float, default=None,
                    help="MB of the next GEMV's weights the norm/merge/SwiGLU kernels' spare blocks pull into L2 "
                         "(0: off; default: the engine's)")
    ap.add_argument("--no-pdl", action="store_true", help="decode kernels launched without programmatic dependent launch")
    ap.add_argument("--sweep", default="",
                    help="engine settings to time the decode rows at, same weights, same run: "
                         "'pdl=0;pdl=1;pdl=1,prefetch_mb=2' (a settings group per ';')")
    ap.add_argument("--splits", type=int, default=32, help="the decode attention's key splits (at most 128)")
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens (the 1k-context decode row)")
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed at each context")
    ap.add_argument("--contexts", default="8192", help="extra decode context lengths, comma separated ('' for none)")
    ap.add_argument("--torch-prefill", action="store_true", help="also time transformers' bf16 prefill (same shapes)")
    ap.add_argument("--out", default="bench/results/qwen3_decode.json")
    args = ap.parse_args()
    reference = None
    if args.torch_prefill:
        proc = subprocess.run([sys.executable, __file__, "--torch-child", str(args.layers), str(args.prompt)],
                              capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        reference = json.loads(line[0][7:]) if line else {"error": (proc.stderr or proc.stdout)[-2000:]}
        print(f"transformers prefill: {reference.get('prefill_tokens_per_s', 'failed')} tokens/s"
              if line else f"transformers prefill failed:\n{reference['error']}", flush=True)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    free0, total = cp.cuda.runtime.memGetInfo()
    peak = [0]

    def sample_mem():
        cp.cuda.Device().synchronize()
        peak[0] = max(peak[0], free0 - cp.cuda.runtime.memGetInfo()[0])

    copy_bw = copy_bandwidth()
    free0 = cp.cuda.runtime.memGetInfo()[0]

    cfg = Qwen3Config(n_layer=args.layers)  # the defaults are Qwen3-32B's shapes
    t0 = time.perf_counter()
    eng = Qwen3GPU.random(cfg, bits=args.bits, group_size=128, seed=0, cache_dtype=kv_cache_dtype(args.kv_bits),
                          act_bits=args.act_bits)
    eng.attention_variant = args.attention
    eng.fuse_rope = not args.unfused_rope
    if args.prefetch_mb is not None:
        eng.prefetch_mb = args.prefetch_mb
    eng.pdl = not args.no_pdl
    sweep = parse_settings(args.sweep)
    eng.decode_splits = args.splits  # read when the cache is made
    eng.sync()
    load_s = time.perf_counter() - t0
    max_len = max([args.prompt + 2 * args.steps + 16] + [c + args.steps + 1 for c in contexts])
    cache = eng.new_cache(1, max_len)
    eng.set_sampling(SamplingParams(temperature=0.6, top_k=20, top_p=0.95), seed=1)  # Qwen3's defaults
    sample_mem()
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.prompt))

    eng.prefill_sample(prompt, cache)  # compiles the kernels
    eng.decode_sample(cache)  # eager step (compiles the rest), then the graph is captured
    eng.decode_sample(cache)
    sample_mem()
    cache.truncate(0)
    eng.sync()
    t0 = time.perf_counter()
    eng.prefill_sample(prompt, cache)
    prefill_s = time.perf_counter() - t0
    sample_mem()

    scale_bytes = 4 if eng.kv_scales is not None else 0  # int8: a float32 scale per head vector
    kv_per_pos = 2 * cfg.n_layer * cfg.n_kv_head * (cfg.head_dim * np.dtype(eng.cache_dtype).itemsize + scale_bytes)
    weights_read = eng.decode_bytes_per_token()
    rows = []

    def decode_at(length: int, sampling: str = "top-k 20, top-p 0.95, T 0.6"):
        eng.seek(cache, length)
        eng.decode_sample(cache)  # the graph exists; one untimed replay
        eng.sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            eng.decode_sample(cache)
        dt = (time.perf_counter() - t) / args.steps
        ctx = length + args.steps // 2
        nbytes = weights_read + kv_per_pos * ctx
        roof = copy_bw / nbytes
        rows.append({"context": ctx, "sampling": sampling, "prefetch_mb": eng.prefetch_mb, "pdl": eng.pdl,
                     "setting": setting[0], "tokens_per_s": 1 / dt, "ms_per_token": dt * 1e3, "bytes_per_token": nbytes,
                     "roofline_tokens_per_s": roof, "share_of_roofline": (1 / dt) / roof})
        sample_mem()

    setting = [""]
    for group in sweep:
        setting[0] = apply_settings(eng, group)
        if group:  # a new body: one eager step (compiles), then a fresh capture
            eng.seek(cache, args.prompt)
            eng.decode_sample(cache)
        decode_at(args.prompt)
        for c in contexts:
            decode_at(c)
    eng.set_sampling(SamplingParams(temperature=0.0), seed=1)  # argmax: what the filters cost
    decode_at(args.prompt, "greedy")
    pool = cp.get_default_memory_pool().total_bytes()
    res = {"commit": commit(), "model": f"Qwen3-32B shapes, {args.layers} layers, random {args.bits}-bit weights (group 128)",
           "device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "copy_GBps": copy_bw / 1e9,
           "weights_GB": eng.weight_bytes() / 1e9, "load_s": load_s, "max_len": max_len,
           "prefill_tokens": args.prompt, "prefill_s": prefill_s, "prefill_tokens_per_s": args.prompt / prefill_s,
           "decode": rows, "peak_device_GB": peak[0] / 1e9, "pool_GB": pool / 1e9,
           "device_total_GB": total / 1e9, "kv_cache_dtype": np.dtype(eng.cache_dtype).name,
           "kv_bits": args.kv_bits, "act_bits": args.act_bits, "attention": args.attention, "fuse_rope": not args.unfused_rope, "prefetch_mb": eng.prefetch_mb,
           "pdl": not args.no_pdl, "sweep": args.sweep, "splits": args.splits, "kv_cache_GB": kv_per_pos * max_len / 1e9,
           "torch_prefill": reference}
    if reference and "prefill_tokens_per_s" in reference:
        res["prefill_vs_torch"] = res["prefill_tokens_per_s"] / reference["prefill_tokens_per_s"]
    print(f"{res['model']} on {res['device']}; copy {copy_bw / 1e9:.0f} GB/s; weights {res['weights_GB']:.2f} GB "
          f"(made on the GPU in {load_s:.1f} s)")
    print(f"{'phase':<22}{'tokens/s':>10}{'ms/token':>10}{'GB/token':>10}{'roofline':>10}{'share':>8}")
    print(f"{'prefill ' + str(args.prompt):<22}{res['prefill_tokens_per_s']:>10.0f}"
          f"{prefill_s / args.prompt * 1e3:>10.3f}")
    for r in rows:
        label = f"decode ctx {r['context']}" + (" greedy" if r["sampling"] == "greedy" else "") \
            + (f" {r['setting']}" if r["setting"] else "")
        print(f"{label:<22}{r['tokens_per_s']:>10.1f}{r['ms_per_token']:>10.2f}"
              f"{r['bytes_per_token'] / 1e9:>10.2f}{r['roofline_tokens_per_s']:>10.1f}{r['share_of_roofline']:>8.0%}")
    if "prefill_vs_torch" in res:
        print(f"{'transformers prefill':<22}{reference['prefill_tokens_per_s']:>10.0f}{'':>30}"
              f"  koifish = {res['prefill_vs_torch']:.0%} of it")
    print(f"peak device memory {res['peak_device_GB']:.2f} GB (CuPy pool {res['pool_GB']:.2f} GB; "
          f"KV cache {kv_per_pos * max_len / 1e9:.2f} GB {res['kv_cache_dtype']} for {max_len} positions)")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
