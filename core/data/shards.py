"""llm.c token shards: a header of 256 little-endian int32, then the tokens.

    magic 20240520, version 1: uint16 tokens (GPT-2's 50257 fit)
    magic 20240801, version 7: uint32 tokens (vocabularies past 65535, e.g. Llama 3, Qwen3)
    magic 20251218 (Koifish's Qwen3 shards): header[3] gives the bytes per token (2 or 4)
header[2] is the number of tokens. Tokens are memory-mapped, never read whole: a shard of
100M tokens is 200 MB and a run reads only the windows it needs.
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
# llm.c magic -> (the version it must carry, token dtype)
_LLMC = {MAGIC_V1: (1, np.uint16), MAGIC_V7: (7, np.uint32)}
MAX_TOKENS = 2**31 - 1  # header[2] is an int32


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    """The shard file."""
    magic: int
    """header[0]: 20240520, 20240801 or 20251218."""
    version: int
    """header[1]: 1 for uint16 llm.c shards, 7 for uint32 ones; Koifish's own value otherwise."""
    num_tokens: int
    """header[2]: how many tokens follow the header."""
    dtype: np.dtype
    """uint16 or uint32 (stored little-endian)."""


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Read and check a shard's header; the file must hold at least the tokens it announces."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise DataError(f"{path}: no such shard file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a token shard file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the shard: {e.strerror}") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes, too small for a shard header of {HEADER_BYTES} bytes")
    header = np.frombuffer(raw, dtype="<i4")
    magic, version, num_tokens = int(header[0]), int(header[1]), int(header[2])
    if magic in _LLMC:
        want_version, dtype = _LLMC[magic]
        if version != want_version:
            raise DataError(f"{path}: unknown version {version} for magic {magic} "
                            f"(expected version {want_version})")
    elif magic == MAGIC_KOIFISH:
        width = int(header[3])
        if width not in (2, 4):
            raise DataError(f"{path}: Koifish shard header[3] (bytes per token) must be 2 or 4, "
                            f"got {width}")
        dtype = np.uint16 if width == 2 else np.uint32
    else:
        raise DataError(f"{path}: not a token shard: magic number {magic}, expected {MAGIC_V1} (llm.c, uint16), "
                        f"{MAGIC_V7} (llm.c, uint32) or {MAGIC_KOIFISH} (Koifish)")
    if num_tokens < 0:
        raise DataError(f"{path}: header[2] gives a negative token count ({num_tokens})")
    dtype = np.dtype(dtype)
    need = HEADER_BYTES + num_tokens * dtype.itemsize
    if size < need:
        raise DataError(f"{path}: truncated: header says {num_tokens:,} tokens ({need:,} bytes), "
                        f"the file has {size:,} bytes")
    return ShardHeader(path, magic, version, num_tokens, dtype)


def open_tokens(path: str | os.PathLike) -> np.ndarray:
    """The shard's tokens as a read-only np.memmap (pages come in as they are touched).

    An empty shard gives an empty ndarray: np.memmap refuses zero-length maps.
    """
    h = read_header(path)
    if h.num_tokens == 0:
        return np.zeros(0, dtype=h.dtype)
    return np.memmap(h.path, dtype=h.dtype.newbyteorder("<"), mode="r", offset=HEADER_BYTES,
                     shape=(h.num_tokens,))


def write_shard(path: str | os.PathLike, tokens, dtype=None) -> Path:
    """Write tokens as an llm.c shard, atomically: a reader never sees a half-written file.

    dtype None picks uint16 (version 1) when every token is below 65536, else uint32 (version 7).
    """
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise DataError(f"{path}: tokens must be a 1-D sequence, got shape {tokens.shape}")
    if tokens.size > MAX_TOKENS:
        raise DataError(f"{path}: {tokens.size:,} tokens do not fit one shard (at most {MAX_TOKENS:,})")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{path}: tokens must be integers, got {tokens.dtype}")
    low, high = (int(tokens.min()), int(tokens.max())) if tokens.size else (0, 0)
    if dtype is None:
        dtype = np.uint16 if high < 2**16 else np.uint32
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise DataError(f"{path}: shard tokens are uint16 or uint32, got {dtype}")
    if low < 0 or high >= 2 ** (8 * dtype.itemsize):
        raise DataError(f"{path}: token ids {low}..{high} do not fit {dtype}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1] = (MAGIC_V1, 1) if dtype == np.uint16 else (MAGIC_V7, 7)
    header[2] = tokens.size
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(dtype.newbyteorder("<"), copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{path}: cannot write the shard: {e.strerror or e}") from None
    return path
