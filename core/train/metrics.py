"""The metrics stream: RUN_DIR/metrics.jsonl, one JSON object per line.

Only the trainer writes it (through MetricsWriter); the CLI, `koifish plot` and the TUI read it
with read_metrics. Every line has `kind`, `step` and `time` (unix seconds). Kinds:
  train  loss, lr, grad_norm, tokens (seen so far), tokens_per_s
  eval   loss, tokens (evaluated)
  event  signal, value, action (instability detections and what was done)
  run    status: started | finished | failed | stopped (and `message` when failed)
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def _finite_or_none(v):
    # JSON has no NaN/Infinity; keep the line parseable by every reader and say what happened.
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    """Appends records to RUN_DIR/metrics.jsonl; each line is flushed when written."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, kind: str, step: int, **fields) -> dict:
        record = {"kind": kind, "step": int(step), "time": round(time.time(), 3)}
        record.update({k: _finite_or_none(v) for k, v in fields.items()})
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        return record

    def truncate_after(self, step: int) -> None:
        """Drop train/eval lines past `step` (used on resume, so the stream reads as one run)."""
        self._f.close()
        kept = [r for r in read_metrics(self.path.parent) if r.get("kind") not in ("train", "eval") or r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(run_dir: str | os.PathLike, kinds: tuple[str, ...] | None = None) -> list[dict]:
    """All complete records of RUN_DIR/metrics.jsonl (a half-written last line is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # the writer is mid-line; the rest comes on the next read
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if kinds is None or rec.get("kind") in kinds:
                out.append(rec)
    return out
