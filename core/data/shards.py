"""llm.c token shards: a header of 256 int32, then the tokens.

    magic 20240520, version 1: uint16 tokens (GPT-2's 50257 fit)
    magic 20240801, version 7: uint32 tokens (vocabularies past 65535, e.g. Qwen3)
    magic 20251218 (Koifish's Qwen3 shards): header[3] gives the bytes per token (2 or 4)
header[2] is the number of tokens. Tokens are memory-mapped, never read whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from koifish_core.errors import DataError

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAGIC_V1, MAGIC_V7, MAGIC_KOIFISH = 20240520, 20240801, 20251218
_LLMC = {MAGIC_V1: (1, np.uint16), MAGIC_V7: (7, np.uint32)}


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    magic: int
    version: int
    num_tokens: int
    dtype: np.dtype


def read_header(path: str | os.PathLike) -> ShardHeader:
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise DataError(f"{path}: no such shard file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a token shard file") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes, too small for a shard header of {HEADER_BYTES} bytes")
    header = np.frombuffer(raw, dtype="<i4")
    magic, version, num_tokens = int(header[0]), int(header[1]), int(header[2])
    if magic in _LLMC:
        want_version, dtype = _LLMC[magic]
        if version != want_version:
            raise DataError(f"{path}: magic {magic} expects version {want_version}, header says {version}")
    elif magic == MAGIC_KOIFISH:
        width = int(header[3])
        if width not in (2, 4):
            raise DataError(f"{path}: Koifish shard header[3] (bytes per token) must be 2 or 4, got {width}")
        dtype = np.uint16 if width == 2 else np.uint32
    else:
        raise DataError(f"{path}: not a token shard: magic number {magic}, expected {MAGIC_V1} (llm.c, uint16), "
                        f"{MAGIC_V7} (llm.c, uint32) or {MAGIC_KOIFISH} (Koifish)")
    if num_tokens < 0:
        raise DataError(f"{path}: header gives a negative token count ({num_tokens})")
    dtype = np.dtype(dtype)
    need = HEADER_BYTES + num_tokens * dtype.itemsize
    if size < need:
        raise DataError(f"{path}: truncated: header says {num_tokens:,} tokens ({need:,} bytes), "
                        f"the file has {size:,} bytes")
    return ShardHeader(path, magic, version, num_tokens, dtype)


def open_tokens(path: str | os.PathLike) -> np.memmap:
    """The shard's tokens as a read-only memory map (pages come in as they are touched)."""
    h = read_header(path)
    if h.num_tokens == 0:
        return np.zeros(0, dtype=h.dtype)  # np.memmap refuses empty maps
    return np.memmap(h.path, dtype=h.dtype.newbyteorder("<"), mode="r", offset=HEADER_BYTES, shape=(h.num_tokens,))


def write_shard(path: str | os.PathLike, tokens, dtype=None) -> Path:
    """Write tokens as an llm.c shard, atomically (a reader never sees a half-written file)."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if dtype is None:
        dtype = np.uint16 if tokens.size == 0 or int(tokens.max()) < 2**16 else np.uint32
    dtype = np.dtype(dtype)
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= 2 ** (8 * dtype.itemsize)):
        raise DataError(f"{path}: token ids out of range for {dtype}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1] = (MAGIC_V1, 1) if dtype == np.uint16 else (MAGIC_V7, 7)
    header[2] = tokens.size
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(dtype.newbyteorder("<"), copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{path}: cannot write shard: {e.strerror}") from None
    return path
