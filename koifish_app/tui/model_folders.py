"""Model folders the chat screen can open: children of --models-dir and the Hugging Face cache."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from koifish_core.infer.model_resolve import hub_caches, snapshot_of


@dataclass
class ModelFolder:
    name: str
    """What the user would type (`Qwen/Qwen3-0.6B` for the HF cache, the folder name otherwise)."""
    path: Path
    model_type: str
    """config.json's model_type ("?" when unreadable); chat needs "qwen3"."""
    source: str
    """"models-dir" or "hf-cache"."""


def _model_type(folder: Path) -> str:
    try:
        return str(json.loads((folder / "config.json").read_text()).get("model_type", "?"))
    except (OSError, ValueError, AttributeError):
        return "?"


def _hub_entries(root: Path) -> list[ModelFolder]:
    out = []
    for repo_dir in sorted(root.glob("models--*")):
        snapshot = snapshot_of(repo_dir)
        if snapshot is not None:
            name = "/".join(repo_dir.name.split("--")[1:])
            out.append(ModelFolder(name, snapshot, _model_type(snapshot), "hf-cache"))
    return out


def find_model_folders(models_dir: Path | None, hub_roots: list[Path] | None = None) -> list[ModelFolder]:
    """Every model folder found, --models-dir first; unreadable places are skipped quietly."""
    found: list[ModelFolder] = []
    try:
        if models_dir is not None and Path(models_dir).is_dir():
            root = Path(models_dir)
            for child in sorted(root.iterdir()):
                if (child / "config.json").is_file():
                    found.append(ModelFolder(child.name, child, _model_type(child), "models-dir"))
            found += [ModelFolder(m.name, m.path, m.model_type, "models-dir") for m in _hub_entries(root)]
        for root in hub_roots if hub_roots is not None else hub_caches():
            if root.is_dir():
                found += _hub_entries(root)
    except OSError:
        pass
    seen, unique = set(), []
    for m in found:
        if m.path.resolve() not in seen:
            seen.add(m.path.resolve())
            unique.append(m)
    return unique
