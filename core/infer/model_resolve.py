"""MODEL on the command line -> a model folder: a path, or a name found in --models-dir or the HF cache.

Names match case-insensitively: `qwen3-32b`, `Qwen3-32B`, `Qwen/Qwen3-32B`, `qwen3-32b-awq`.
Hugging Face's cache keeps a repo as models--{org}--{name}/snapshots/{commit}/ with
refs/main naming the current commit; that snapshot wins, else the newest one with config.json.
"""

from __future__ import annotations

import os
from pathlib import Path

from koifish_core.errors import ModelError


def hub_caches() -> list[Path]:
    """Where huggingface_hub keeps downloads, in its own order of precedence."""
    env = os.environ
    roots = []
    if env.get("HF_HUB_CACHE"):
        roots.append(Path(env["HF_HUB_CACHE"]))
    if env.get("HF_HOME"):
        roots.append(Path(env["HF_HOME"]) / "hub")
    if env.get("XDG_CACHE_HOME"):
        roots.append(Path(env["XDG_CACHE_HOME"]) / "huggingface" / "hub")
    roots.append(Path.home() / ".cache" / "huggingface" / "hub")
    return list(dict.fromkeys(roots))


def snapshot_of(repo_dir: Path) -> Path | None:
    """The snapshot folder of a cached repo (models--org--name), or None if none is usable."""
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        current = repo_dir / "snapshots" / ref.read_text().strip()
        if (current / "config.json").exists():
            return current
    snapshots = [s for s in (repo_dir / "snapshots").glob("*") if (s / "config.json").exists()]
    return max(snapshots, key=lambda s: s.stat().st_mtime) if snapshots else None


def _split(name: str) -> tuple[str | None, str]:
    org, _, repo = name.rpartition("/")
    return (org.lower() or None), repo.lower()


def _in_hub(root: Path, org: str | None, repo: str) -> Path | None:
    if not root.is_dir():
        return None
    for repo_dir in sorted(root.glob("models--*")):
        parts = repo_dir.name.split("--")
        if len(parts) >= 3 and parts[-1].lower() == repo and (org is None or parts[1].lower() == org):
            snapshot = snapshot_of(repo_dir)
            if snapshot is not None:
                return snapshot
    return None


def _in_models_dir(root: Path, org: str | None, repo: str) -> Path | None:
    if not root.is_dir():
        return None
    for child in sorted(root.iterdir()):
        if child.is_dir() and child.name.lower() == repo and (child / "config.json").exists():
            return child
    return _in_hub(root, org, repo)


def _hf_repo_id(name: str) -> str:
    """Qwen's spelling of a lower-case name: qwen3-32b-awq -> Qwen/Qwen3-32B-AWQ."""
    if "/" in name or not name.lower().startswith("qwen"):
        return name

    def spell(part: str) -> str:
        if part.startswith("qwen"):
            return "Qwen" + part[4:]
        return part.upper() if part in ("awq", "gptq", "fp8") or part[:-1].replace(".", "").isdigit() else part

    return "Qwen/" + "-".join(spell(p) for p in name.lower().split("-"))


def _download_hint(name: str) -> str:
    repo_id = _hf_repo_id(name)
    return f"Download it with `hf download {repo_id}` (or `huggingface-cli download {repo_id}`), or pass its folder."


def resolve_model(model: str | Path, models_dir: str | Path | None = None) -> Path:
    """The folder MODEL names; ModelError listing every place looked otherwise."""
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path}: expected a model folder (config.json, *.safetensors, tokenizer.json), "
                             "got a file")
        if path.name.startswith("models--") and (path / "snapshots").is_dir():
            snapshot = snapshot_of(path)
            if snapshot is None:
                raise ModelError(f"{path}: a Hugging Face cache entry with no complete snapshot (no config.json)")
            return snapshot
        return path
    if text.startswith((".", "~", "/")) or text.count("/") > 1 or "\\" in text:  # a path, not a repo name
        raise ModelError(f"{path}: no such model folder")
    org, repo = _split(text)
    looked = []
    if models_dir is not None:
        root = Path(models_dir).expanduser()
        looked.append(f"{root} (--models-dir)")
        found = _in_models_dir(root, org, repo)
        if found is not None:
            return found
    for root in hub_caches():
        looked.append(str(root))
        found = _in_hub(root, org, repo)
        if found is not None:
            return found
    raise ModelError(f"model {text!r} not found; looked for a folder of that name and for the Hugging Face cache "
                     f"entry models--*--{repo} in: {', '.join(looked)}. {_download_hint(text)}")
