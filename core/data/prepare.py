"""`koifish data prepare`: plain text files to llm.c shards with GPT-2's BPE.

Each file is one document; `<|endoftext|>` (50256) goes before every document, as in llm.c's
fineweb.py. The last `val_fraction` of the token stream becomes `{name}_val_000000.bin`, the rest
`{name}_train_000000.bin`, `..._000001.bin`, ... of at most `shard_tokens` tokens each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from koifish_core.errors import DataError


@dataclass
class PrepareResult:
    train_paths: list[Path] = field(default_factory=list)
    val_paths: list[Path] = field(default_factory=list)
    num_train_tokens: int = 0
    num_val_tokens: int = 0


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such text file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; give the text files inside it") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from None


def _write_split(out_dir: Path, name: str, split: str, tokens: np.ndarray, shard_tokens: int) -> list[Path]:
    from koifish_core.data.shards import write_shard

    paths = []
    for i, start in enumerate(range(0, max(len(tokens), 1), shard_tokens)):
        chunk = tokens[start:start + shard_tokens]
        if chunk.size == 0:
            break
        paths.append(write_shard(out_dir / f"{name}_{split}_{i:06d}.bin", chunk))
    return paths


def prepare_texts(files, out_dir, val_fraction: float = 0.05, shard_tokens: int = 100_000_000,
                  progress=None, name: str | None = None) -> PrepareResult:
    from koifish_core.data.tokenizer import EOT, gpt2_encoding

    files = [Path(f) for f in files]
    out_dir = Path(out_dir)
    if not files:
        raise DataError("no input files given")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens <= 0:
        raise DataError(f"shard tokens must be positive, got {shard_tokens}")
    for f in files:
        if not f.exists():
            raise DataError(f"{f}: no such text file")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out_dir}: cannot create the output folder: {e.strerror}") from None
    name = name or out_dir.resolve().name or "data"

    enc = gpt2_encoding()
    total_bytes = sum(f.stat().st_size for f in files)
    task = progress.add_task("tokenizing", total=total_bytes) if progress is not None else None
    parts = []
    for f in files:
        text = _read_text(f)
        # Long files go through in pieces so the progress bar moves.
        ids = [EOT]
        for piece in _pieces(text):
            ids.extend(enc.encode_ordinary(piece))
            if progress is not None:
                progress.advance(task, len(piece.encode("utf-8")))
        parts.append(np.asarray(ids, dtype=np.uint32))
    tokens = np.concatenate(parts)
    if tokens.size <= len(files):
        raise DataError(f"{', '.join(map(str, files))}: no text to tokenize")
    n_val = int(round(tokens.size * val_fraction))
    train, val = tokens[:tokens.size - n_val], tokens[tokens.size - n_val:]
    result = PrepareResult(num_train_tokens=int(train.size), num_val_tokens=int(val.size))
    result.train_paths = _write_split(out_dir, name, "train", train, shard_tokens)
    result.val_paths = _write_split(out_dir, name, "val", val, shard_tokens)
    return result


def _pieces(text: str, size: int = 1 << 20):
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        # Cut after a newline that a non-space follows: GPT-2's pre-tokenizer never joins
        # across such a point, so the pieces tokenize exactly as the whole text would.
        while end < len(text):
            nl = text.rfind("\n", start, end)
            if nl <= start:
                end = len(text)  # no safe cut in this window: take the rest whole
                break
            if not text[nl + 1].isspace():
                end = nl + 1
                break
            end = nl
        yield text[start:end]
        start = end
