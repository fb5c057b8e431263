"""GPT-2 training throughput: koifish's CUDA engine against PyTorch on the same GPU, same run.

    python bench/bench_train.py --sizes 124M,355M --batch 16 --steps 30 --out bench/train.json
    python bench/bench_train.py --sizes 124M --batch 4,8,16,32      # a batch sweep, each B in both frameworks
    python bench/bench_train.py --batch 32 --repeats 3 --frameworks koifish,koifish:gelu=kernel,torch  # an A/B

Each framework runs in its own subprocess (so peak memory is its own): random tokens, T=1024,
warm-up steps, then `--steps` timed steps. PyTorch gets what a user would pick: torch.compile,
bf16 autocast, SDPA (flash) attention, fused AdamW, the same B, T, model and optimizer.
Prints a table; writes JSON with the GPU name and the koifish commit. torch is a benchmark
reference only, never a koifish dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import apply_engine_options, child_result, commit, engine_flags, engine_options, gpu_name, write_json  # noqa: E402

SIZES = {"124M": (12, 12, 768), "355M": (24, 16, 1024), "774M": (36, 20, 1280), "1558M": (48, 25, 1600)}
H100_BF16_PEAK = 989e12  # dense bf16 tensor-core peak of an H100 SXM, for MFU


def flops_per_token(L, C, T, n_params):
    return 6 * n_params + 12 * L * T * C


def precision(compute: str, options=None) -> dict:
    """The case's precision block koifish_step runs: the residual stream and its gradient as the engine
    options ask, else as cases/gpt2_*.json keep them (bf16), where compute allows (fp32 under fp32)."""
    residual = getattr(options, "residual", "bf16") if compute == "bf16" else "fp32"
    residual_grad = getattr(options, "residual_grad", "bf16") if residual == "bf16" else "fp32"
    return {"compute": compute, "residual": residual, "residual_grad": residual_grad}


def koifish_step(size, B, T, remat=0, dist=None, collective=None, rank=0, compute="bf16", attention="auto",
                 options=None):
    """koifish's CUDA engine for GPT-2 `size` on random tokens: returns (step, eng, chosen); step() runs
    one train_step on a fresh batch and returns its result. dist/collective: a data-parallel rank's case
    block and collective (bench_dist.py); options: the parsed engine_options flags (bench_common), None
    for the engine's defaults (precision: the cases'); chosen: what they set."""
    import numpy as np

    import koifish_cuda.compat  # noqa: F401
    from koifish_core.config.load import build_case
    from koifish_core.engine.cuda_gpt2 import CUDAEngine

    L, H, C = SIZES[size]
    if getattr(options, "head_mib", None) is not None:  # read when the engine sizes its buffers
        import koifish_core.config.plan as plan

        plan.HEAD_BYTES = options.head_mib << 20
    case = build_case({"model": {"n_layer": L, "n_head": H, "n_embd": C, "n_ctx": T, "remat": remat},
                       "data": {"batch_size": B, "seq_len": T}, "train": {"device": "cuda"},
                       "precision": precision(compute, options), "dist": dist or {}}, "bench")
    eng = CUDAEngine(case, attention=attention)
    chosen = apply_engine_options(eng, options) if options is not None else {}
    eng.attach_collective(collective, case.dist)
    rng = np.random.default_rng(rank)  # each rank its own rows
    batch = lambda: (rng.integers(0, 50257, (B, T)), rng.integers(0, 50257, (B, T)))  # noqa: E731
    return (lambda: eng.train_step([batch()], 1e-4)), eng, chosen


def run_koifish(size, B, T, steps, warmup, remat=0, dist=None, collective=None, rank=0, compute="bf16",
                attention="auto", options=None):
    """koifish_step's engine timed: tokens/s of this process, first-step latency, memory."""
    import cupy as cp

    t0 = time.perf_counter()
    step, eng, chosen = koifish_step(size, B, T, remat, dist, collective, rank, compute, attention, options)
    step()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        r = step()
    cp.cuda.Device().synchronize()
    dt = time.perf_counter() - t0
    free, total = cp.cuda.runtime.memGetInfo()
    return {"tokens_per_s": steps * B * T / dt, "step_ms": 1000 * dt / steps, "first_step_s": first, "loss": r.loss,
            "peak_vram_bytes": cp.get_default_memory_pool().total_bytes(), "device_used_bytes": total - free,
            "n_params": eng.n_params, "compute": compute, "attention": eng.attn.name, "attention_note": eng.attn_note,
            **chosen}


def torch_step(size, B, T):
    """PyTorch's GPT-2 of `size` as a user would train it (compile, bf16 autocast, SDPA, fused AdamW,
    clipping at 1.0): returns (step, model); step() runs one step on random tokens, returns the loss."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    L, H, C = SIZES[size]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            Bx, Tx, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(Bx, Tx, H, C // H).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(Bx, Tx, C)
            x = x + self.c_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(50304, C), nn.Embedding(T, C)
            self.h = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(C)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            for b in self.h:
                x = b(x)
            logits = self.ln_f(x) @ self.wte.weight.T
            return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))

    torch.backends.cuda.matmul.allow_tf32 = True
    model = GPT().cuda()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), fused=True)
    cmodel = torch.compile(model)

    def step():
        x = torch.randint(0, 50257, (B, T), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = cmodel(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, model


def run_torch(size, B, T, steps, warmup):
    import torch

    t0 = time.perf_counter()
    step, model = torch_step(size, B, T)
    step().item()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    dt = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters()) - (50304 - 50257) * SIZES[size][2]
    return {"tokens_per_s": steps * B * T / dt, "first_step_s": first, "loss": float(loss),
            "peak_vram_bytes": torch.cuda.max_memory_allocated(), "n_params": n_params}


def child(args):
    if args.child == "koifish":
        res = run_koifish(args.size, int(args.batch), args.seq, args.steps, args.warmup, args.remat, compute=args.compute,
                          attention=args.attention, options=args)
    else:
        res = run_torch(args.size, int(args.batch), args.seq, args.steps, args.warmup)
    print("RESULT " + json.dumps(res), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="124M")
    ap.add_argument("--batch", default="16", help="B, or several: 4,8,16,32")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--frameworks", default="koifish,torch",
                    help="koifish, torch, and koifish:KERNEL=VARIANT[+KERNEL=VARIANT] (koifish with these --variants "
                         "added: an A/B in the same call, e.g. koifish,koifish:gelu=kernel,torch)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each framework, alternating (koifish, torch, koifish, ...); the table gives medians")
    ap.add_argument("--remat", type=int, default=0, help="koifish's model.remat (0, 1, 2)")
    ap.add_argument("--compute", default="bf16", choices=("bf16", "fp32"), help="koifish's precision.compute")
    ap.add_argument("--attention", default="auto", choices=("auto", "cudnn", "cublas"), help="koifish's attention")
    engine_options(ap)
    ap.add_argument("--out", default="bench/train.json")
    ap.add_argument("--child", default=None)
    ap.add_argument("--size", default=None)
    args = ap.parse_args()
    if args.child:
        return child(args)
    rows = []
    for size, batch, rep, fw in ((s, b, k, f) for s in args.sizes.split(",") for b in args.batch.split(",")
                                 for k in range(args.repeats) for f in args.frameworks.split(",")):
        # one child process a (size, B, framework): its peak memory is its own
        base, _, extra = fw.partition(":")
        flags = engine_flags(args)
        at = flags.index("--variants") + 1
        flags[at] = ",".join(filter(None, (flags[at], extra.replace("+", ","))))
        cmd = [sys.executable, __file__, "--child", base, "--size", size, "--batch", batch,
               "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup), "--remat", str(args.remat),
               "--compute", args.compute, "--attention", args.attention] + flags
        res = child_result(cmd, tail=1500)
        if "error" in res:
            rows.append({"size": size, "batch": int(batch), "framework": fw, "repeat": rep, "error": res["error"]})
            print(f"{size} B={batch} {fw}: FAILED\n{rows[-1]['error']}", flush=True)
            continue
        L, H, C = SIZES[size]
        res["mfu"] = flops_per_token(L, C, args.seq, res["n_params"]) * res["tokens_per_s"] / H100_BF16_PEAK
        rows.append({"size": size, "batch": int(batch), "framework": fw, "repeat": rep, **res})
        print(f"{size} B={batch} {fw}: {res['tokens_per_s']:,.0f} tok/s, MFU {res['mfu']:.1%}, "
              f"peak {res['peak_vram_bytes'] / 2**30:.1f} GiB, first step {res['first_step_s']:.1f} s", flush=True)
    report = {"gpu": gpu_name(), "commit": commit(), "remat": args.remat, **precision(args.compute, args),
              "batch": int(args.batch) if "," not in args.batch else [int(b) for b in args.batch.split(",")],
              "seq": args.seq, "steps": args.steps, "repeats": args.repeats, "rows": rows,
              "summary": summarize(rows)}
    print(f"\n{'size':>6} {'B':>3} {'framework':>9} {'tok/s':>10} {'ratio':>6} {'MFU':>6} {'VRAM GiB':>9} {'1st step s':>10}"
          + ("  runs (tok/s)" if args.repeats > 1 else ""))
    for r in report["summary"]:
        if r["runs"] == 0:
            print(f"{r['size']:>6} {r['batch']:>3} {r['framework']:>9} {'failed':>10}")
            continue
        ratio = f"{r['ratio']:.3f}x" if r.get("ratio") else ""
        runs = "  " + " ".join(f"{t:,.0f}" for t in r["tokens_per_s_runs"]) if args.repeats > 1 else ""
        print(f"{r['size']:>6} {r['batch']:>3} {r['framework']:>9} {r['tokens_per_s']:>10,.0f} {ratio:>6} {r['mfu']:>6.1%} "
              f"{r['peak_vram_bytes'] / 2**30:>9.1f} {r['first_step_s']:>10.1f}{runs}")
    write_json(args.out, report)


def summarize(rows: list[dict]) -> list[dict]:
    """A row a (size, B, framework): the median tokens/s (and MFU) of its runs, every run's tokens/s, the
    largest peak VRAM, the first run's first-step latency, and (not torch) the ratio of its median to
    torch's median."""
    import statistics

    groups: dict = {}
    for r in rows:
        groups.setdefault((r["size"], r["batch"], r["framework"]), []).append(r)
    out = []
    for (size, batch, fw), runs in groups.items():
        good = [r for r in runs if "error" not in r]
        row = {"size": size, "batch": batch, "framework": fw, "runs": len(good)}
        if good:
            row.update(tokens_per_s=statistics.median(r["tokens_per_s"] for r in good),
                       tokens_per_s_runs=[r["tokens_per_s"] for r in good], mfu=statistics.median(r["mfu"] for r in good),
                       peak_vram_bytes=max(r["peak_vram_bytes"] for r in good), first_step_s=good[0]["first_step_s"])
        out.append(row)
    medians = {(r["size"], r["batch"], r["framework"]): r.get("tokens_per_s") for r in out}
    for r in out:
        ref = medians.get((r["size"], r["batch"], "torch"))
        if r["framework"] != "torch" and ref and r.get("tokens_per_s"):
            r["ratio"] = r["tokens_per_s"] / ref
    return out


if __name__ == "__main__":
    main()
