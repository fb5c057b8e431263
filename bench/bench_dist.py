"""Data-parallel scaling of the CUDA engine: GPT-2 tokens/s on N GPUs against one.

    python bench/bench_dist.py --sizes 124M,1558M --gpus 1,2 --out bench/results/dist.json

Each configuration runs as its own job of N processes (one per GPU, started as `--gpus N` starts
them), each with the same per-GPU micro-batch on random tokens (weak scaling: the global batch
grows with N). Modes for N > 1: `overlap` (bucket all-reduces captured inside the backward graph,
the default), `after` (one all-reduce after backward) and `zero1` (ZeRO-1: reduce-scatter,
sharded AdamW, all-gather). Rank 0 reports tokens/s over all ranks, its peak VRAM and step time.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import commit, gpu_name, write_json  # noqa: E402
from bench_train import run_koifish  # noqa: E402

DEFAULT_BATCH = {"124M": 16, "355M": 8, "774M": 8, "1558M": 4}


def rank_main(args) -> None:
    from koifish_core.dist.launch_env import from_environ

    env = from_environ()
    rdv = collective = None
    if env.world_size > 1:
        from koifish_core.dist.setup import join

        ctx, rdv = join(env, "cuda")
        collective = ctx.collective
    res = run_koifish(args.size, args.batch, args.seq, args.steps, args.warmup, args.remat,
                      dist={"zero1": args.mode == "zero1", "overlap": args.mode == "overlap"},
                      collective=collective, rank=env.rank)
    if env.rank == 0:
        res["tokens_per_s"] *= env.world_size  # every rank ran as many tokens
        print("RESULT " + json.dumps(res), flush=True)
    if rdv is not None:
        rdv.close()


def run_job(args, size: str, world: int, mode: str) -> dict:
    from koifish_core.dist.spawn import free_port, rank_environment

    cmd = [sys.executable, os.path.abspath(__file__), "--rank-main", "--size", size, "--batch", str(args.batch or DEFAULT_BATCH[size]),
           "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup), "--remat", str(args.remat),
           "--mode", mode]
    port = free_port()
    logs = [tempfile.TemporaryFile("w+") for _ in range(world)]
    procs = [subprocess.Popen(cmd, env=rank_environment(r, world, port), stdout=logs[r], stderr=subprocess.STDOUT,
                              text=True) for r in range(world)]
    deadline = time.monotonic() + args.timeout
    while any(p.poll() is None for p in procs):  # a failed rank ends the job at once
        if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.2)
    for p in procs:
        p.wait()
    texts = []
    for f in logs:
        f.seek(0)
        texts.append(f.read())
    line = [l for l in texts[0].splitlines() if l.startswith("RESULT ")]
    if any(p.returncode for p in procs) or not line:
        return {"error": "\n".join(t[-1500:] for t in texts)}
    return json.loads(line[0][7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="124M,1558M")
    ap.add_argument("--gpus", default="1,2", help="world sizes to run, e.g. 1,2,4,8")
    ap.add_argument("--modes", default="overlap,after,zero1", help="modes for world sizes > 1")
    ap.add_argument("--batch", type=int, default=None, help="per-GPU micro-batch (default: by size)")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--remat", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--out", default="bench/dist.json")
    ap.add_argument("--rank-main", action="store_true")
    ap.add_argument("--size", default=None)
    ap.add_argument("--mode", default="overlap")
    args = ap.parse_args()
    if args.rank_main:
        return rank_main(args)
    rows = []
    for size in args.sizes.split(","):
        base = None
        for world in (int(g) for g in args.gpus.split(",")):
            for mode in (["single"] if world == 1 else args.modes.split(",")):
                res = run_job(args, size, world, "overlap" if mode == "single" else mode)
                row = {"size": size, "gpus": world, "mode": mode, **res}
                if "error" in res:
                    print(f"{size} x{world} {mode}: FAILED\n{res['error']}", flush=True)
                else:
                    if world == 1:
                        base = res["tokens_per_s"]
                    row["scaling"] = res["tokens_per_s"] / base if base else None
                    sc = f"{row['scaling']:.2f}x" if row["scaling"] else "-"
                    print(f"{size} x{world} {mode}: {res['tokens_per_s']:,.0f} tok/s ({sc}), {res['step_ms']:.1f} ms/step, "
                          f"GPU memory {res['device_used_bytes'] / 2**30:.1f} GiB", flush=True)
                rows.append(row)
    report = {"gpus": gpu_name().splitlines(), "commit": commit(), "seq": args.seq,
              "steps": args.steps, "remat": args.remat, "rows": rows}
    print(f"\n{'size':>6} {'GPUs':>4} {'mode':>8} {'tok/s':>10} {'scaling':>8} {'ms/step':>8} {'GiB':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['size']:>6} {r['gpus']:>4} {r['mode']:>8} {'failed':>10}")
            continue
        sc = f"{r['scaling']:.2f}x" if r.get("scaling") else "-"
        print(f"{r['size']:>6} {r['gpus']:>4} {r['mode']:>8} {r['tokens_per_s']:>10,.0f} {sc:>8} {r['step_ms']:>8.1f} "
              f"{r['device_used_bytes'] / 2**30:>6.1f}")
    write_json(args.out, report)


if __name__ == "__main__":
    main()
