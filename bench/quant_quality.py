"""What each weight width costs in quality: perplexity of a model with its linear weights
quantized group-wise to 8/4/3 bits (embeddings and norms stay float, as `koifish quantize`
leaves them), on the same held-out windows. Runs on the CPU.

    koifish train --out runs/default            # the default case: GPT-2 on the shipped corpus
    python bench/quant_quality.py runs/default --data builtin:kjv:val --out bench/results/quant_quality_default.json
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="a koifish run or checkpoint folder, or a GPT-2/Qwen3 Hugging Face folder")
    ap.add_argument("--data", default="builtin:kjv:val")
    ap.add_argument("--bits", default="8,4,3")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--int8-activations", action="store_true",
                    help="also 4-bit weights with every linear's input rounded to int8 per 16 values (the GPU decode's GEMVs)")
    ap.add_argument("--out", default="bench/quant_quality.json")
    args = ap.parse_args()

    from koifish_core.infer.quant_quality import perplexity_by_bits

    print(f"{'bits':>5} {'loss':>8} {'perplexity':>11} {'vs float':>9}", flush=True)
    rows = []

    def show(r):
        base = rows[0]["perplexity"] if rows else r.perplexity
        rows.append({"bits": r.bits, "act_bits": r.act_bits, "loss": r.loss, "perplexity": r.perplexity,
                     "tokens": r.tokens, "perplexity_increase": r.perplexity / base - 1})
        label = "float" if r.bits == 32 else str(r.bits) + ("+a8" if r.act_bits == 8 else "")
        print(f"{label:>5} {r.loss:>8.4f} {r.perplexity:>11.3f} {rows[-1]['perplexity_increase']:>+9.2%}", flush=True)

    perplexity_by_bits(args.model, args.data, bits_list=tuple(int(b) for b in args.bits.split(",")),
                       seq_len=args.seq_len, max_windows=args.windows, group_size=args.group_size, on_result=show,
                       int8_activations=args.int8_activations)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": str(args.model), "data": args.data, "group_size": args.group_size,
                   "windows": args.windows, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
