"""The corpus shipped with koifish (`builtin:kjv`), tokenized once into a cache folder."""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
from pathlib import Path

import numpy as np

from koifish_core.errors import DataError

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
BUILTIN = {"kjv": CORPUS_DIR / "kjv.txt.xz"}
VAL_EVERY = 20  # every 20th chapter is held out


def cache_root() -> Path:
    return Path(os.environ.get("KOIFISH_CACHE", Path.home() / ".cache" / "koifish"))


def read_documents(name: str = "kjv") -> list[str]:
    if name not in BUILTIN:
        raise DataError(f"builtin:{name}: unknown corpus; available: {', '.join(sorted(BUILTIN))}")
    text = lzma.decompress(BUILTIN[name].read_bytes()).decode("utf-8")
    return [c for c in text.split("\n\n") if c.strip()]


def split_documents(docs: list[str]) -> tuple[list[str], list[str]]:
    train = [d for i, d in enumerate(docs, 1) if i % VAL_EVERY]
    val = [d for i, d in enumerate(docs, 1) if i % VAL_EVERY == 0]
    return train, val


def encode_documents(docs: list[str]) -> np.ndarray:
    """GPT-2 tokens with <|endoftext|> before each document (as llm.c's fineweb.py does)."""
    from koifish_core.data.tokenizer import EOT, gpt2_encoding

    enc = gpt2_encoding()
    parts = []
    for ids in enc.encode_ordinary_batch(docs, num_threads=2):
        parts.append(np.array([EOT] + ids, dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def builtin_shards(name: str = "kjv") -> tuple[list[Path], list[Path]]:
    """(train paths, val paths) of the builtin corpus, tokenized on first use."""
    from koifish_core.data.shards import write_shard

    if name not in BUILTIN:
        raise DataError(f"builtin:{name}: unknown corpus; available: {', '.join(sorted(BUILTIN))}")
    digest = hashlib.sha256(BUILTIN[name].read_bytes()).hexdigest()[:12]
    folder = cache_root() / f"{name}-{digest}"
    train, val = folder / f"{name}_train_000000.bin", folder / f"{name}_val_000000.bin"
    if train.exists() and val.exists():
        return [train], [val]
    # Build in a private folder and rename it into place: a concurrent run never sees half a cache.
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    train_docs, val_docs = split_documents(read_documents(name))
    write_shard(tmp / train.name, encode_documents(train_docs))
    write_shard(tmp / val.name, encode_documents(val_docs))
    try:
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; its copy is identical
        if not (train.exists() and val.exists()):
            raise DataError(f"{folder}: cannot create the corpus cache (set KOIFISH_CACHE to a writable folder)")
    return [train], [val]
