"""The corpus shipped with koifish (`builtin:kjv`), tokenized once into a cache folder.

kjv.txt.xz holds the King James Bible, one chapter per blank-line separated block (a heading line
such as "Genesis 1", then one verse per line); see corpus/README.md. Each chapter is a document
(<|endoftext|> before it, as prepare.py does) and every VAL_EVERY-th chapter is held out, so the
validation text comes from across the whole book rather than from its last pages.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import threading
from pathlib import Path

import numpy as np

from koifish_core.errors import DataError

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
BUILTIN = {"kjv": CORPUS_DIR / "kjv.txt.xz"}
VAL_EVERY = 20  # chapters 20, 40, 60, ... (canonical order) are the validation split
_BUILD_LOCK = threading.Lock()  # threads of one process build once; processes race safely (see below)


def cache_root() -> Path:
    """$KOIFISH_CACHE, or ~/.cache/koifish."""
    return Path(os.environ.get("KOIFISH_CACHE") or Path.home() / ".cache" / "koifish")


def _corpus_file(name: str) -> Path:
    if name not in BUILTIN:
        raise DataError(f"builtin:{name}: unknown corpus; available: {', '.join(sorted(BUILTIN))}")
    if not BUILTIN[name].is_file():
        raise DataError(f"{BUILTIN[name]}: the shipped corpus file is missing; reinstall koifish")
    return BUILTIN[name]


def read_documents(name: str = "kjv") -> list[str]:
    """The corpus as a list of documents (chapters), in canonical order."""
    text = lzma.decompress(_corpus_file(name).read_bytes()).decode("utf-8")
    return [c.strip("\n") for c in text.split("\n\n") if c.strip()]


def split_documents(docs: list[str]) -> tuple[list[str], list[str]]:
    """(train, val): every VAL_EVERY-th document (1-based) goes to val."""
    train = [d for i, d in enumerate(docs, 1) if i % VAL_EVERY]
    val = [d for i, d in enumerate(docs, 1) if i % VAL_EVERY == 0]
    return train, val


def encode_documents(docs: list[str]) -> np.ndarray:
    """GPT-2 tokens (uint16) with <|endoftext|> before each document (as llm.c's fineweb.py does)."""
    from koifish_core.data.tokenizer import EOT, gpt2_encoding

    enc = gpt2_encoding()
    parts = [np.array([EOT] + ids, dtype=np.uint16) for ids in enc.encode_ordinary_batch(docs, num_threads=2)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def cache_folder(name: str = "kjv") -> Path:
    """Where builtin_shards(name) keeps its shards: keyed by the corpus file's hash, so a new corpus
    file never reuses stale tokens."""
    digest = hashlib.sha256(_corpus_file(name).read_bytes()).hexdigest()[:12]
    return cache_root() / f"{name}-{digest}"


def builtin_shards(name: str = "kjv") -> tuple[list[Path], list[Path]]:
    """(train paths, val paths) of the builtin corpus, tokenized on first use (about a second)."""
    folder = cache_folder(name)
    train, val = folder / f"{name}_train_000000.bin", folder / f"{name}_val_000000.bin"
    if train.exists() and val.exists():
        return [train], [val]
    with _BUILD_LOCK:
        if not (train.exists() and val.exists()):
            _build(name, folder, train, val)
    return [train], [val]


def _build(name: str, folder: Path, train: Path, val: Path) -> None:
    from koifish_core.data.shards import write_shard

    # Build in a private folder, then rename it into place in one step: a concurrent run sees
    # either no folder or a complete one. If two runs race, the loser's identical copy is dropped.
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    train_docs, val_docs = split_documents(read_documents(name))
    train_tokens, val_tokens = encode_documents(train_docs), encode_documents(val_docs)
    try:
        write_shard(tmp / train.name, train_tokens, dtype=np.uint16)
        write_shard(tmp / val.name, val_tokens, dtype=np.uint16)
        os.replace(tmp, folder)
    except (OSError, DataError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (train.exists() and val.exists()):
            why = e if isinstance(e, DataError) else e.strerror
            raise DataError(f"{folder}: cannot create the builtin:{name} token cache ({why}); set "
                            "KOIFISH_CACHE to a writable folder, or delete this one if it is damaged") from None
