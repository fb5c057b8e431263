"""Checkpoints: RUN_DIR/checkpoints/step_XXXXXXXX/{model.safetensors, optim.safetensors, state.json}.

Written atomically: everything goes into a private temporary folder, each file and the folder are
fsynced, then one rename makes the checkpoint appear whole. A folder whose name does not match
step_XXXXXXXX (a temporary one left by a crash) is never picked up, and is cleaned on the next save.
Only this module writes checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from koifish_core.errors import CheckpointError

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step_(\d{8})$")
FILES = ("model.safetensors", "optim.safetensors", "state.json")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name) and all((p / f).exists() for f in FILES)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest(run_dir: str | Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def save(run_dir: str | Path, step: int, model_tensors: dict[str, np.ndarray], optim_tensors: dict[str, np.ndarray],
         state: dict, keep_last: int) -> Path:
    from safetensors.numpy import save_file

    folder = Path(run_dir) / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a run that died mid-write
    final = folder / f"step_{step:08d}"
    tmp = folder / f".tmp-step_{step:08d}-{os.getpid()}"
    tmp.mkdir()
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in model_tensors.items()}, str(tmp / "model.safetensors"))
        save_file({k: np.ascontiguousarray(v) for k, v in optim_tensors.items()}, str(tmp / "optim.safetensors"))
        (tmp / "state.json").write_text(json.dumps(dict(state, step=step), indent=1))
        for f in FILES:
            _fsync_file(tmp / f)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (after a resume): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{final}: cannot write checkpoint: {e.strerror or e}") from None
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: incomplete checkpoint, {path.name} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read (truncated or damaged?): {e}") from None


def load(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """(model tensors, optimizer tensors, state) of one checkpoint folder."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    missing = [f for f in FILES if not (path / f).exists()]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    try:
        state = json.loads((path / "state.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'state.json'}: not valid JSON: {e.msg}") from None
    return _load_safetensors(path / "model.safetensors"), _load_safetensors(path / "optim.safetensors"), state


def copy_into(views: dict[str, np.ndarray], tensors: dict[str, np.ndarray], where: Path) -> None:
    """Copy checkpoint tensors into a model's views, checking every name and shape."""
    for name, view in views.items():
        if name not in tensors:
            raise CheckpointError(f"{where}: tensor {name!r} is missing; the checkpoint is of another model")
        if tensors[name].shape != view.shape:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                  f"the case's model needs {tuple(view.shape)}")
        view[...] = tensors[name]
    extra = sorted(set(tensors) - set(views))
    if extra:
        raise CheckpointError(f"{where}: unexpected tensors {extra[:3]}; the checkpoint is of another model")


def load_model_weights(path: str | Path, model) -> dict:
    """Fill a model's parameters from a checkpoint; returns the checkpoint's state."""
    path = Path(path)
    missing = [f for f in ("model.safetensors", "state.json") if not (path / f).exists()]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    copy_into(model.param_views(), _load_safetensors(path / "model.safetensors"), path / "model.safetensors")
    return json.loads((path / "state.json").read_text())
