"""The prefill's weight dequantization into bf16 (koifish_cuda.quant.dequantize_bf16), by shape.

    python bench/bench_dequant.py --out bench/results/dequant_bf16.json

Random codes with Qwen3-32B's shapes, group 128; each call timed from CUDA-graph replays.
GB/s counts the packed codes, scales and zeros read plus the bf16 written; the share is of the
device-to-device copy bandwidth measured in the same run (read + write).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import commit, copy_bandwidth, gpu_name, median_time, write_json  # noqa: E402

# (name, N, K, band of rows n0:n0+n or None, band of columns k0:k0+kc or None)
SHAPES = [
    ("qkv 10240x5120", 10240, 5120, None, None),
    ("o_proj 5120x8192", 5120, 8192, None, None),
    ("gate band 6400x5120", 51200, 5120, (0, 6400), None),
    ("down band 5120x6400", 5120, 25600, None, (6400, 6400)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8, 3])
    ap.add_argument("--out", default="bench/results/dequant_bf16.json")
    args = ap.parse_args()

    import cupy as cp
    import numpy as np

    from koifish_cuda.quant import dequantize_bf16

    copy = copy_bandwidth()
    G = 128
    rows = []
    print(f"dequantize_bf16 on {gpu_name()}; copy {copy / 1e9:.0f} GB/s")
    print(f"{'shape':<22}{'bits':>5}{'us':>9}{'GB/s':>8}{'copy':>7}")
    for bits in args.bits:
        for name, N, K, rband, cband in SHAPES:
            words = cp.random.randint(0, 2**31, size=(N, K * bits // 32), dtype=np.int64).astype(np.uint32)
            scales = cp.random.random_sample((N, K // G)).astype(np.float32)
            zeros = cp.full((N, K // G), 2 ** (bits - 1), dtype=np.uint8)
            n0, n = rband if rband else (0, N)
            k0, kc = cband if cband else (0, K)
            out = cp.empty((n, kc), np.uint16)
            t = median_time(lambda s: dequantize_bf16(out, words, scales, zeros, bits, G, n0, k0, s))
            moved = n * kc * (bits / 8 + 2) + n * (kc // G) * 5
            gbps = moved / t
            rows.append({"shape": name, "bits": bits, "us": t * 1e6, "GBps": gbps / 1e9, "copy_share": gbps / copy})
            print(f"{name:<22}{bits:>5}{t * 1e6:>9.1f}{gbps / 1e9:>8.0f}{gbps / copy:>7.0%}")
            del words, scales, zeros, out
    write_json(args.out, {"gpu": gpu_name(), "commit": commit(), "copy_GBps": copy / 1e9, "rows": rows})


if __name__ == "__main__":
    main()
