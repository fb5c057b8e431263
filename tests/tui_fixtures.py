"""Synthetic run folders written the way the trainer writes them, and fakes for the TUI tests."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from koifish_app.tui.system_stats import GPUReading, SystemReading


def train_record(step: int, t0: float, loss: float | None = None, **extra) -> dict:
    rec = {"kind": "train", "step": step, "time": round(t0 + step, 3),
           "loss": 5.0 - 0.01 * step if loss is None else loss, "lr": 1e-3, "grad_norm": 0.5 + 0.001 * step,
           "tokens": 1024 * step, "tokens_per_s": 2048.0, "step_ms": 500.0}
    rec.update(extra)
    return rec


def append_records(run_dir: Path, records: list[dict]) -> None:
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def write_run(run_dir: Path, steps: int = 40, total: int = 100, case: str = "tiny", status: str | None = None,
              pid: int | None = None, events: list[dict] | None = None, t0: float | None = None) -> list[dict]:
    """A run folder after `steps` logged steps: case.json, metrics.jsonl (run/train/eval/event lines),
    run.pid when pid is given, and a final run record when status is given. Returns the records."""
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time() - steps - 5 if t0 is None else t0
    (run_dir / "case.json").write_text(json.dumps({"name": case, "train": {"steps": total, "device": "cpu"}}))
    records = [{"kind": "run", "step": 0, "time": t0, "status": "started", "case": case, "device": "cpu",
                "parameters": 1234, "total_steps": total}]
    for step in range(1, steps + 1):
        records.append(train_record(step, t0))
        if step % 20 == 0:
            records.append({"kind": "eval", "step": step, "time": t0 + step, "loss": 4.9 - 0.01 * step,
                            "tokens": 4096})
    records += events or []
    if status is not None:
        extra = {"message": "boom: out of memory"} if status == "failed" else {}
        records.append({"kind": "run", "step": steps, "time": t0 + steps, "status": status, **extra})
    append_records(run_dir, records)
    if pid is not None:
        (run_dir / "run.pid").write_text(str(pid))
    return records


class FakeStats:
    """A machine with one GPU whose numbers the test knows."""

    def __init__(self, gpu: bool = True):
        self.gpu = gpu

    def read(self) -> SystemReading:
        if not self.gpu:
            return SystemReading(cpu_percent=37.0, ram_used=3 * 2**30, ram_total=16 * 2**30)
        return SystemReading(gpus=[GPUReading("Fake H100", 40 * 2**30, 80 * 2**30, 97.0, 71.0, 512.0, 700.0)])


class FakeReply:
    def __init__(self, text, tokens, seconds, finish):
        self.text, self.tokens, self.seconds, self.finish = text, tokens, seconds, finish


class FakeCommand:
    def __init__(self, kind, message):
        self.kind, self.message = kind, message


class FakeOptions:
    think = True


class FakeChatSession:
    """Streams a fixed reply piece by piece (with a pause per piece) like ChatSession.stream."""

    def __init__(self, pieces: list[str], delay: float = 0.01, block: threading.Event | None = None):
        self.pieces, self.delay, self.block = pieces, delay, block
        self.options = FakeOptions()
        self.asked: list[str] = []
        self.last_reply = None
        self._stop = threading.Event()

    @staticmethod
    def is_command(line: str) -> bool:
        return line.startswith("/")

    def command(self, line: str):
        if line.startswith("/think"):
            self.options.think = line.split()[-1] == "on"
            return FakeCommand("think", f"thinking {'on' if self.options.think else 'off'}")
        if line == "/reset":
            return FakeCommand("reset", "conversation cleared")
        return FakeCommand("unknown", f"unknown command {line}")

    def stop(self) -> None:
        self._stop.set()

    def stream(self, text: str):
        self.asked.append(text)
        self._stop.clear()
        start, out, finish = time.perf_counter(), [], "stop"
        for i, piece in enumerate(self.pieces):
            if self.block is not None and i == 1:
                self.block.wait(5)  # lets a test press keys while the reply is half way
            if self._stop.is_set():
                finish = "interrupted"
                break
            time.sleep(self.delay)
            out.append(piece)
            yield piece
        self.last_reply = FakeReply("".join(out), len(out), time.perf_counter() - start, finish)
