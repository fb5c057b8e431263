"""Decode-side kernel of issue 5: the fused dequantize + GEMV on Qwen3-32B's matrix shapes.

    python bench/bench_quant_gemv.py --bits 4 --out bench/results/quant_gemv.json

Times each projection of one Qwen3-32B layer (random 4-bit weights, group 128, batch 1) from
CUDA-graph replays, and projects the weight-reading part of one decode token (64 layers + the
head) against the roofline: weight bytes per token / the copy bandwidth measured in the same run.
This is not the full decode step (attention, norms, sampling are not in it): a lower bound on
decode time per token, i.e. an upper bound on tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

import koifish_cuda.compat  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import copy_bandwidth, median_time  # noqa: E402

HIDDEN, INTER, HEADS, KV, HEAD_DIM, LAYERS, VOCAB = 5120, 25600, 64, 8, 128, 64, 151936
SHAPES = {"q_proj": (HEADS * HEAD_DIM, HIDDEN), "k_proj": (KV * HEAD_DIM, HIDDEN), "v_proj": (KV * HEAD_DIM, HIDDEN),
          "o_proj": (HIDDEN, HEADS * HEAD_DIM), "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN),
          "down_proj": (HIDDEN, INTER)}


def main():
    import cupy as cp

    from koifish_cuda.quant import dequant_matvec

    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--out", default="bench/results/quant_gemv.json")
    args = ap.parse_args()
    copy_bw = copy_bandwidth()
    rows, layer_time, layer_bytes = [], 0.0, 0
    for name, (N, K) in SHAPES.items():
        words = cp.asarray(np.random.default_rng(0).integers(0, 2**32, (N, K * args.bits // 32), dtype=np.uint32))
        ng = K // args.group
        scales = cp.random.random((N, ng), dtype=cp.float32) * 0.01
        zeros = cp.full((N, ng), 2 ** (args.bits - 1), dtype=cp.uint8)
        x = cp.random.standard_normal((1, K), dtype=cp.float32)
        out = cp.empty((1, N), dtype=cp.float32)
        t = median_time(lambda s: dequant_matvec(out, x, words, scales, zeros, args.bits, args.group, s))
        nbytes = words.nbytes + scales.nbytes + zeros.nbytes + x.nbytes + out.nbytes
        rows.append({"matrix": name, "N": N, "K": K, "us": t * 1e6, "GBps": nbytes / t / 1e9,
                     "share_of_copy": nbytes / t / copy_bw})
        layer_time += t
        layer_bytes += nbytes
        print(f"{name:<10} {N:>6} x {K:<6} {t * 1e6:8.1f} us {nbytes / t / 1e9:8.0f} GB/s {nbytes / t / copy_bw:6.0%}")
    head_bytes = VOCAB * HIDDEN * args.bits / 8  # the head at the same width, timed as the layers' mean rate
    token_bytes = LAYERS * layer_bytes + head_bytes
    token_time = LAYERS * layer_time + head_bytes / (layer_bytes / layer_time)
    roofline = copy_bw / token_bytes
    res = {"bits": args.bits, "group": args.group, "copy_GBps": copy_bw / 1e9, "rows": rows,
           "weight_GB_per_token": token_bytes / 1e9, "projected_tokens_per_s": 1 / token_time,
           "roofline_tokens_per_s": roofline, "share_of_roofline": (1 / token_time) / roofline}
    print(f"weights per token {token_bytes / 1e9:.1f} GB; GEMV-only projection {1 / token_time:.1f} tokens/s; "
          f"roofline {roofline:.1f} tokens/s ({res['share_of_roofline']:.0%}); copy {copy_bw / 1e9:.0f} GB/s")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
