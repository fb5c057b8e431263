"""Batches of B x (T+1) tokens from llm.c shards, with a position that checkpoints can restore.

Windows are consecutive (llm.c's DataLoader): x = buf[:-1], y = buf[1:], and the position moves
by B*T per rank. Rank r of W starts at r*B*T and moves by W*B*T, so ranks read disjoint windows.
When a shard cannot fill the next batch the loader moves to the next shard, and after the last
one it starts again at the first (a new epoch).
"""

from __future__ import annotations

import glob as globlib
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from koifish_core.data.shards import open_tokens, read_header
from koifish_core.errors import DataError

BUILTIN_PREFIX = "builtin:"


def resolve_paths(spec: str | os.PathLike | Sequence, max_shards: int | None = None) -> list[Path]:
    """Shard paths from a glob, a folder (its *.bin), a list, or builtin:NAME[:train|:val]."""
    if isinstance(spec, (list, tuple)):
        paths = [Path(p) for p in spec]
    else:
        spec = str(spec)
        if spec.startswith(BUILTIN_PREFIX):
            from koifish_core.data.corpus import builtin_shards

            name, _, split = spec[len(BUILTIN_PREFIX):].partition(":")
            train, val = builtin_shards(name)
            if split not in ("", "train", "val"):
                raise DataError(f"{spec}: expected builtin:{name}, builtin:{name}:train or builtin:{name}:val")
            paths = val if split == "val" else train
        elif Path(spec).is_dir():
            paths = sorted(Path(spec).glob("*.bin"))
            if not paths:
                raise DataError(f"{spec}: folder holds no *.bin token shards")
        else:
            paths = sorted(Path(p) for p in globlib.glob(os.path.expanduser(spec)))
            if not paths:
                where = Path(os.path.expanduser(spec)).parent
                hint = "" if where.is_dir() else f" (folder {where} does not exist)"
                raise DataError(f"{spec}: no token shards match this pattern{hint}")
    if max_shards is not None:
        paths = paths[:max_shards]
    return paths


class TokenLoader:
    def __init__(self, paths, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 max_shards: int | None = None):
        if batch_size <= 0 or seq_len <= 0:
            raise DataError(f"batch size and sequence length must be positive, got B={batch_size}, T={seq_len}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        self.paths = resolve_paths(paths, max_shards)
        self.B, self.T, self.rank, self.world = batch_size, seq_len, rank, world_size
        need = self._first_pos() + self.B * self.T + 1
        self._sizes = [read_header(p).num_tokens for p in self.paths]  # validates every header up front
        if not any(n >= need for n in self._sizes):
            raise DataError(f"no shard holds the {need:,} tokens one batch needs (B={batch_size}, T={seq_len}, "
                            f"rank {rank} of {world_size}); largest has {max(self._sizes):,}: {self.paths[0].parent}")
        self._tokens = None
        self.reset()

    def _first_pos(self) -> int:
        return self.rank * self.B * self.T

    def reset(self) -> None:
        self.shard_index, self.position, self.epoch = 0, self._first_pos(), 0
        self._open(0)
        self._skip_small_shards()

    def _open(self, index: int) -> None:
        self.shard_index = index
        self._tokens = open_tokens(self.paths[index])

    def _fits(self) -> bool:
        return self.position + self.B * self.T + 1 <= self._sizes[self.shard_index]

    def _skip_small_shards(self) -> None:
        while not self._fits():
            nxt = self.shard_index + 1
            if nxt == len(self.paths):
                nxt, self.epoch = 0, self.epoch + 1
            self.position = self._first_pos()
            self._open(nxt)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.B * self.T
        buf = np.asarray(self._tokens[self.position:self.position + n + 1], dtype=np.int32)
        x = buf[:-1].reshape(self.B, self.T)
        y = buf[1:].reshape(self.B, self.T)
        self.position += n * self.world
        self._skip_small_shards()
        return x, y

    def state(self) -> dict:
        return {"shard_index": self.shard_index, "position": self.position, "epoch": self.epoch,
                "shard": self.paths[self.shard_index].name, "batch_size": self.B, "seq_len": self.T}

    def load_state(self, state: dict) -> None:
        if (state.get("batch_size"), state.get("seq_len")) != (self.B, self.T):
            raise DataError(f"loader state was saved for B={state.get('batch_size')}, T={state.get('seq_len')}; "
                            f"this run has B={self.B}, T={self.T}")
        index = int(state["shard_index"])
        if index >= len(self.paths) or self.paths[index].name != state.get("shard", self.paths[index].name):
            raise DataError(f"loader state points at shard {state.get('shard')!r} (#{index}), which is not "
                            f"shard #{index} of {len(self.paths)} now; the data set changed since the checkpoint")
        self._open(index)
        self.position, self.epoch = int(state["position"]), int(state["epoch"])


def eval_batches(paths, batch_size: int, seq_len: int, max_batches: int | None = None) -> Iterator:
    """The validation batches, always the same ones: from the start of the first shard."""
    loader = TokenLoader(paths, batch_size, seq_len)
    count = 0
    while max_batches is None or count < max_batches:
        if loader.epoch > 0:
            return  # one pass at most
        yield loader.next_batch()
        count += 1


def _stream_chunks(paths, chunk: int = 1 << 20) -> Iterator[np.ndarray]:
    for path in resolve_paths(paths):
        tokens = open_tokens(path)
        for i in range(0, tokens.shape[0], chunk):
            yield np.asarray(tokens[i:i + chunk], dtype=np.int64)


def iter_windows(paths, seq_len: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive windows of T inputs and their T next tokens over the concatenated shards
    (windows cross shard boundaries); the tail that cannot fill a window is dropped."""
    pending = np.zeros(0, dtype=np.int64)
    for chunk in _stream_chunks(paths):
        pending = np.concatenate([pending, chunk])
        count = (pending.size - 1) // seq_len
        for k in range(count):
            w = pending[k * seq_len:(k + 1) * seq_len + 1]
            yield w[:-1], w[1:]
        pending = pending[count * seq_len:]
