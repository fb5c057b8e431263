"""Fault injection table for the instability note: each fault on the same case, against a clean run.

    python bench/instability_table.py --device cuda --steps 600 --out bench/results/instability.json
    python bench/instability_table.py --clean-steps 5000 --device cuda    # false alarms of a long clean run

Columns: fault, step caught, action, steps lost, final loss and final val loss next to the clean run's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from koifish_core.config import load_case
from koifish_core.train.faults import parse_inject
from koifish_core.train.metrics import read_metrics
from koifish_core.train.trainer import train


def run(case_path, steps, device, inject, workdir):
    loaded = load_case(case_path)
    loaded.case.checkpoint.every = max(1, steps // 6)
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    res = train(loaded, run_dir, steps=steps, device=device, inject=parse_inject(inject))
    events = [r for r in read_metrics(run_dir) if r["kind"] == "event"]
    return res, events


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default=None, help="case file (default: the embedded default case)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--clean-steps", type=int, default=0, help="also count alarms over a long clean run")
    ap.add_argument("--out", default="bench/results/instability.json")
    args = ap.parse_args()
    s = args.steps
    faults = [[], [f"nan@{s // 3}"], [f"spike@{s // 2}"], [f"inf-param@{2 * s // 3 + 7}"]]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        clean = None
        for inject in faults:
            res, events = run(args.case, s, args.device, inject, work)
            if not inject:
                clean = res
            caught = [e for e in events if e["signal"] != "rollback"]
            rolled = [e for e in events if e["signal"] == "rollback"]
            lost = (rolled[0]["step"] - rolled[0]["value"]) if rolled else (1 if caught else 0)
            rows.append({"fault": inject[0] if inject else "none", "caught_at": [e["step"] for e in caught],
                         "signals": [e["signal"] for e in caught],
                         "action": "rollback" if rolled else (caught[0]["action"] if caught else "-"),
                         "steps_lost": lost, "final_loss": res.final_loss, "final_val_loss": res.final_val_loss,
                         "clean_final_val_loss": clean.final_val_loss, "alarms": len(caught)})
        long = None
        if args.clean_steps:
            res, events = run(args.case, args.clean_steps, args.device, [], work)
            long = {"steps": args.clean_steps, "alarms": len([e for e in events if e["signal"] != "rollback"]),
                    "events": events, "final_val_loss": res.final_val_loss}
    print(f"{'fault':<14} {'caught at':<12} {'action':<10} {'steps lost':>10} {'final val':>10} {'clean val':>10}")
    for r in rows:
        print(f"{r['fault']:<14} {','.join(map(str, r['caught_at'])) or '-':<12} {r['action']:<10} "
              f"{r['steps_lost']:>10} {r['final_val_loss']:>10.4f} {r['clean_final_val_loss']:>10.4f}")
    if long:
        print(f"long clean run: {long['alarms']} alarm(s) in {long['steps']} steps")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": args.device, "steps": s, "rows": rows, "long_clean": long}, indent=1))


if __name__ == "__main__":
    main()
