"""One run folder as the dashboard sees it: series, events, status, progress. Reads files only.

RUN_DIR holds metrics.jsonl (followed incrementally), case.json (the resolved case), run.pid
(while the trainer lives) and checkpoints/step_XXXXXXXX/ (complete ones; .tmp-* are in flight).
Nothing here raises on a missing or unreadable folder: `error` says what is wrong instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

from koifish_app.tui.metrics_tail import MetricsTail
from koifish_app.tui.series import Columns

PID_FILE = "run.pid"  # written by the trainer while it runs (koifish_core.train.trainer.PID_FILE)
STOP_FILE = "STOP"  # the trainer checks it after every step
RECENT_S = 120.0
"""A run with no pid to check counts as running while its metrics changed this recently."""
EOE_SIGNALS = ("expert_switch", "evolution")
"""Event signals that mark the loss chart (EOE) instead of raising an alert."""
ENDED = ("finished", "failed", "stopped")
TRAIN_COLUMNS = ("step", "loss", "tokens", "time", "lr", "grad_norm", "tokens_per_s", "mfu")


class RunWatch:
    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.name = self.run_dir.name or str(self.run_dir)
        self.tail = MetricsTail(self.run_dir)
        self.train = Columns(TRAIN_COLUMNS)
        self.evals = Columns(("step", "loss"))
        self.alerts: list[dict] = []
        """Instability events (kind "event" other than EOE marks), oldest first."""
        self.marks: list[dict] = []
        """EOE events (expert switch, evolution) drawn on the chart."""
        self.run_records: list[dict] = []
        self.last_train: dict = {}
        self.acked = 0
        """Alerts the user has acknowledged (the first `acked` of self.alerts)."""
        self.version = 0
        """Bumped whenever anything shown changed, so widgets redraw only then."""
        self.error: str | None = None
        self.case: dict | None = None
        self.case_error: str | None = None
        self._case_mtime: float | None = None
        self.child: subprocess.Popen | None = None
        """The trainer process when this dashboard launched it (then its exit code is known)."""
        self._lock = threading.Lock()  # a worker thread may be reading a large backlog

    # ---- reading ----

    @property
    def loading(self) -> bool:
        """A poll is under way (in a worker thread, for a long file opened the first time)."""
        return self._lock.locked()

    def unread_bytes(self) -> int:
        try:
            return max(self.tail.path.stat().st_size - self.tail.size, 0)
        except OSError:
            return 0

    def poll(self) -> bool:
        """Reads what changed on disk; True when anything shown may differ. Returns at once
        (False) while another thread is polling this run."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            return self._poll()
        finally:
            self._lock.release()

    def _poll(self) -> bool:
        before = (self.version, self.error)
        try:
            if not self.run_dir.exists():
                self.error = f"{self.run_dir}: no such run folder"
            elif not self.run_dir.is_dir():
                self.error = f"{self.run_dir}: not a folder (expected a run folder with metrics.jsonl)"
            else:
                self.error = None
                self._read_case()
                read = self.tail.poll()
                if read.restarted:
                    self._clear()
                for rec in read.records:
                    self._add(rec)
                if read.records or read.restarted:
                    self.version += 1
        except OSError as e:  # permissions, a vanished NFS mount, ...
            self.error = f"{self.run_dir}: cannot read ({e.strerror or e})"
        return (self.version, self.error) != before

    def _read_case(self) -> None:
        path = self.run_dir / "case.json"
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            self.case, self.case_error, self._case_mtime = None, None, None
            return
        if mtime == self._case_mtime:
            return
        self._case_mtime = mtime
        try:
            case = json.loads(path.read_text())
            ok = isinstance(case, dict)
            self.case, self.case_error = (case, None) if ok else (None, f"{path}: expected a JSON object")
        except json.JSONDecodeError as e:
            self.case, self.case_error = None, f"{path}: not valid JSON (line {e.lineno}): {e.msg}"
        self.version += 1

    def _add(self, rec: dict) -> None:
        kind = rec.get("kind")
        if kind == "train":
            self.train.append(rec)
            self.last_train = rec
        elif kind == "eval":
            self.evals.append(rec)
        elif kind == "event":
            (self.marks if rec.get("signal") in EOE_SIGNALS else self.alerts).append(rec)
        elif kind == "run":
            self.run_records.append(rec)

    def _clear(self) -> None:
        self.train.clear()
        self.evals.clear()
        self.alerts.clear()
        self.marks.clear()
        self.run_records.clear()
        self.last_train = {}
        self.acked = 0

    # ---- what the screens show ----

    @property
    def step(self) -> int | None:
        return int(self.train["step"][-1]) if len(self.train) else None

    @property
    def latest_loss(self) -> float | None:
        return float(self.train["loss"][-1]) if len(self.train) else None

    @property
    def latest_eval(self) -> float | None:
        return float(self.evals["loss"][-1]) if len(self.evals) else None

    @property
    def case_name(self) -> str:
        if self.case is not None:
            return str(self.case.get("name", "?"))
        for rec in reversed(self.run_records):
            if rec.get("case"):
                return str(rec["case"])
        return "?"

    @property
    def total_steps(self) -> int | None:
        for rec in reversed(self.run_records):
            if isinstance(rec.get("total_steps"), int):
                return rec["total_steps"]
        try:
            return int(self.case["train"]["steps"])  # type: ignore[index]
        except (TypeError, KeyError, ValueError):
            return None

    @property
    def unacked(self) -> int:
        return len(self.alerts) - self.acked

    def acknowledge(self) -> None:
        if self.acked != len(self.alerts):
            self.acked = len(self.alerts)
            self.version += 1

    @property
    def active_expert(self):
        if "expert" in self.last_train:
            return self.last_train["expert"]
        for mark in reversed(self.marks):
            if "expert" in mark:
                return mark["expert"]
        return None

    def pid(self) -> int | None:
        if self.child is not None:
            return self.child.pid
        try:
            return int((self.run_dir / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None

    def trainer_alive(self) -> bool | None:
        """True/False when a trainer pid is known, None when there is nothing to check."""
        if self.child is not None:
            return self.child.poll() is None  # our own child: poll() also reaps it (a zombie answers kill(0))
        pid = self.pid()
        if pid is None:
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # alive, owned by someone else
        return True

    def status(self, now: float | None = None) -> str:
        """running | finished | failed | stopped | starting | unknown | missing."""
        if self.error is not None:
            return "missing"
        last = self.run_records[-1].get("status") if self.run_records else None
        alive = self.trainer_alive()
        if alive:  # before the last record: a resumed trainer has not written "resumed" yet
            return "running" if self.tail.mtime is not None else "starting"
        if last in ENDED:
            return last
        if self.child is not None and self.tail.mtime is None:
            return "failed"  # our child ended before writing a single record: see its log
        if alive is None and self.tail.mtime is not None:
            recent = (now or time.time()) - self.tail.mtime < RECENT_S
            return "running" if recent else "unknown"
        return "unknown"

    def seconds_per_step(self, window: int = 50) -> float | None:
        n = len(self.train)
        if n < 2:
            return None
        steps, times = self.train["step"][-window:], self.train["time"][-window:]
        if steps[-1] <= steps[0] or times[-1] <= times[0]:
            return None
        return float((times[-1] - times[0]) / (steps[-1] - steps[0]))

    def eta_s(self) -> float | None:
        total, step, rate = self.total_steps, self.step, self.seconds_per_step()
        if total is None or step is None or rate is None:
            return None
        return max(total - step, 0) * rate

    def checkpoints(self) -> list[str]:
        """Complete checkpoints, oldest first (the trainer renames .tmp-* into place when done)."""
        folder = self.run_dir / "checkpoints"
        try:
            return sorted(p.name for p in folder.iterdir() if p.name.startswith("step_"))
        except OSError:
            return []

    def child_log_tail(self, lines: int = 3) -> str | None:
        """The last lines a launched trainer printed (why it failed before writing metrics)."""
        try:
            text = (self.run_dir / LAUNCH_LOG).read_text(errors="replace")
        except OSError:
            return None
        kept = [line for line in text.splitlines() if line.strip()][-lines:]
        return "\n".join(kept) or None


LAUNCH_LOG = "tui-train.log"
"""Where a trainer started from the dashboard writes its console output (inside its run folder)."""

