"""Acting on runs through files and processes only: stop (RUN_DIR/STOP), resume and start
(`koifish train` as a child process). The dashboard never touches a trainer's memory.

Children start in their own session so that quitting the dashboard, or Ctrl-C in its terminal,
leaves them training; their console output goes to RUN_DIR/tui-train.log.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from koifish_app.tui.run_watch import LAUNCH_LOG, STOP_FILE, RunWatch


class ControlError(Exception):
    """An action the dashboard cannot take; the message is shown to the user as it is."""


def train_command(*args: str) -> list[str]:
    # The interpreter running the dashboard, not whatever `koifish` is first on PATH.
    return [sys.executable, "-m", "koifish_app.cli", "train", *args]


def request_stop(watch: RunWatch) -> str:
    """Creates RUN_DIR/STOP: the trainer checkpoints after its current step and exits as 'stopped'."""
    status = watch.status()
    if status not in ("running", "starting", "unknown"):
        raise ControlError(f"{watch.name} is {status}: nothing to stop")
    stop = watch.run_dir / STOP_FILE
    if stop.exists():
        return f"stop already requested for {watch.name}; waiting for its checkpoint"
    try:
        stop.touch()
    except OSError as e:
        raise ControlError(f"{stop}: cannot create the stop file ({e.strerror or e})") from None
    return f"stop requested for {watch.name}: it checkpoints after this step and exits"


def _launch(args: list[str], run_dir: Path, cwd: Path | None) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / LAUNCH_LOG, "ab")
    try:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=cwd, start_new_session=True)
    except OSError as e:
        raise ControlError(f"cannot start `{' '.join(args)}`: {e.strerror or e}") from None
    finally:
        log.close()  # the child holds its own descriptor


def resume(watch: RunWatch, cwd: Path | None = None) -> subprocess.Popen:
    """`koifish train --resume --out RUN_DIR` (the case comes from RUN_DIR/case.json)."""
    status = watch.status()
    if status in ("running", "starting"):
        raise ControlError(f"{watch.name} is {status}; stop it before resuming")
    if status == "finished":
        raise ControlError(f"{watch.name} finished all its steps; nothing to resume")
    if not watch.checkpoints():
        raise ControlError(f"{watch.run_dir}: no complete checkpoint to resume from")
    if not (watch.run_dir / "case.json").exists():
        raise ControlError(f"{watch.run_dir}: no case.json to resume with")
    child = _launch(train_command("--resume", "--out", str(watch.run_dir)), watch.run_dir, cwd)
    watch.child = child
    return child


def free_run_dir(runs_dir: Path, name: str) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... when taken (the trainer refuses a used folder)."""
    candidate, n = runs_dir / name, 1
    while candidate.exists():
        n += 1
        candidate = runs_dir / f"{name}-{n}"
    return candidate


def start_case(case_path: Path, runs_dir: Path, cwd: Path | None = None) -> tuple[Path, subprocess.Popen]:
    """`koifish train CASE --out RUNS/<case file name>`; returns the run folder and the child."""
    case_path = Path(case_path).expanduser()
    if not case_path.is_file():
        raise ControlError(f"{case_path}: no such case file")
    run_dir = free_run_dir(Path(runs_dir), case_path.stem)
    child = _launch(train_command(str(case_path.resolve()), "--out", str(run_dir)), run_dir, cwd)
    return run_dir, child
