"""Does a precision option change what a model learns? GPT-2 124M trained by `koifish train`'s own loop on
the corpus koifish ships (builtin:kjv), once per setting, same seed and batches: loss curves side by
side, validation loss, tokens/s.

    python bench/bench_precision.py --steps 300 --settings "residual=fp32;residual=bf16;residual=bf16,residual_grad=bf16"
    python bench/bench_precision.py --plot bench/results/precision.json    # the curves as a PNG (matplotlib)
    python bench/bench_precision.py --case cases/default.json --device cpu --steps 5 --batch 2 --settings "compute=fp32"

Settings are precision keys of the case (precision.residual, precision.residual_grad, ...), each run
from cases/gpt2_124M.json with the data, batch, steps and schedule set here. Prints a table (final
train loss as the mean of the last 20 steps, last validation loss, the largest step-wise gap to the
first setting's curve) and writes JSON with every curve.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import commit, gpu_name, parse_settings, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_setting(settings: dict, args, run_dir: Path) -> dict:
    from koifish_core.config.load import LoadedCase, build_case
    from koifish_core.train.metrics import read_metrics
    from koifish_core.train.trainer import train

    raw = json.loads(Path(args.case).read_text())
    raw["data"].update({"train": "builtin:kjv:train", "val": "builtin:kjv:val", "batch_size": args.batch})
    raw.setdefault("optimizer", {})["grad_accum"] = 1
    raw.setdefault("schedule", {})["warmup_steps"] = max(1, args.steps // 10)
    raw["train"].update({"steps": args.steps, "log_every": 1, "device": args.device})
    raw["eval"] = {"every": max(1, args.steps // 3), "batches": 8}
    raw["checkpoint"] = {"every": args.steps, "keep_last": 1}
    raw.setdefault("precision", {}).update(settings)
    case = build_case(raw, "bench_precision")
    t0 = time.perf_counter()
    train(LoadedCase(case, "bench_precision"), run_dir, device=args.device)
    wall = time.perf_counter() - t0
    recs = read_metrics(run_dir)
    tr = [r for r in recs if r["kind"] == "train"]
    ev = [r for r in recs if r["kind"] == "eval"]
    speeds = sorted(r["tokens_per_s"] for r in tr[len(tr) // 2:] if r.get("tokens_per_s"))
    return {"settings": settings, "train": [(r["step"], r["loss"]) for r in tr], "eval": [(r["step"], r["loss"]) for r in ev],
            "tokens_per_s": speeds[len(speeds) // 2] if speeds else None, "wall_s": wall}


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads(path.read_text())
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in report["runs"]:
        label = ",".join(f"{k}={v}" for k, v in run["settings"].items()) or "case default"
        steps, losses = zip(*run["train"])
        line, = ax.plot(steps, losses, lw=0.8, label=f"{label} (train)")
        if run["eval"]:
            ax.plot(*zip(*run["eval"]), "o--", color=line.get_color(), label=f"{label} (val)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{Path(report['case']).stem} on builtin:kjv, B={report['batch']} ({report['gpu']}, {report['commit']})")
    ax.legend(fontsize=8)
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=120, bbox_inches="tight")
    return png


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default="residual=fp32;residual=bf16;residual=bf16,residual_grad=bf16")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--case", default=str(ROOT / "cases" / "gpt2_124M.json"), help="the case the runs start from")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="bench/results/precision.json")
    ap.add_argument("--plot", default=None, help="a JSON this wrote: draw its curves as a PNG beside it, and stop")
    args = ap.parse_args()
    if args.plot:
        print(plot(Path(args.plot)))
        return
    runs = []
    for settings in parse_settings(args.settings):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(run_setting(settings, args, Path(tmp) / "run"))
        print(f"{settings}: done in {runs[-1]['wall_s']:.0f} s", flush=True)
    first = dict(runs[0]["train"])
    print(f"\n{'settings':<44} {'train (last 20)':>15} {'val':>7} {'max gap':>8} {'tokens/s':>10}")
    for run in runs:
        losses = [loss for _, loss in run["train"]]
        gap = max(abs(loss - first[s]) for s, loss in run["train"] if s in first)
        val = run["eval"][-1][1] if run["eval"] else float("nan")
        label = ",".join(f"{k}={v}" for k, v in run["settings"].items())
        print(f"{label:<44} {sum(losses[-20:]) / len(losses[-20:]):>15.4f} {val:>7.4f} {gap:>8.4f} "
              f"{run['tokens_per_s'] or 0:>10,.0f}")
    write_json(args.out, {"gpu": gpu_name(), "commit": commit(), "case": args.case, "steps": args.steps,
                          "batch": args.batch, "runs": runs})


if __name__ == "__main__":
    main()
