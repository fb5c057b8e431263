"""Batches of B x (T+1) tokens from llm.c shards, with a position that checkpoints can restore.

Windows are consecutive (llm.c's DataLoader): x = buf[:-1], y = buf[1:], and the position moves
by B*T per rank. Rank r of W starts at r*B*T and moves by W*B*T, so ranks read disjoint windows.
All ranks change shard together (when the whole world's next step no longer fits, as in llm.c),
and after the last shard the loader starts again at the first one (a new epoch).
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
    """Shard paths, sorted by name, from a glob, a folder (its *.bin), a list of files,
    or builtin:NAME[:train|:val] (the shipped corpus; bare builtin:NAME is its train split).
    max_shards keeps only the first that many (Koifish's "most")."""
    if max_shards is not None and max_shards <= 0:
        raise DataError(f"{spec}: max_shards must be a positive number or null, got {max_shards}")
    if isinstance(spec, (list, tuple)):
        paths = [Path(p) for p in spec]
        if not paths:
            raise DataError("an empty list of shard files was given")
    else:
        spec = str(spec)
        if spec.startswith(BUILTIN_PREFIX):
            paths = _builtin(spec)
        elif Path(spec).expanduser().is_dir():
            folder = Path(spec).expanduser()
            paths = sorted(folder.glob("*.bin"))
            if not paths:
                raise DataError(f"{spec}: the folder holds no *.bin token shards")
        else:
            pattern = os.path.expanduser(spec)
            paths = sorted(Path(p) for p in globlib.glob(pattern) if not Path(p).is_dir())
            if not paths:
                folder = Path(pattern).parent
                where = (f"looked in {folder.resolve()}" if folder.is_dir()
                         else f"the folder {folder.resolve()} does not exist")
                raise DataError(f"{spec}: no token shards match this pattern ({where})")
    return paths[:max_shards] if max_shards is not None else paths


def _builtin(spec: str) -> list[Path]:
    from koifish_core.data.corpus import builtin_shards

    name, _, split = spec[len(BUILTIN_PREFIX):].partition(":")
    if split not in ("", "train", "val"):
        raise DataError(f"{spec}: expected builtin:{name}, builtin:{name}:train or builtin:{name}:val")
    train, val = builtin_shards(name)
    return val if split == "val" else train


class TokenLoader:
    """Deterministic (x, y) int32 batches of shape (B, T) for one rank of `world_size`."""

    def __init__(self, paths, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 max_shards: int | None = None):
        if batch_size <= 0 or seq_len <= 0:
            raise DataError(f"batch size and sequence length must be positive, got B={batch_size}, T={seq_len}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        self.paths = resolve_paths(paths, max_shards)
        self.B, self.T, self.rank, self.world = batch_size, seq_len, rank, world_size
        self._sizes = [read_header(p).num_tokens for p in self.paths]  # checks every header up front
        if not any(self._step_fits(0, n) for n in self._sizes):
            need = self.world * self.B * self.T + 1
            largest = max(range(len(self.paths)), key=self._sizes.__getitem__)
            raise DataError(f"no shard holds the {need:,} tokens one step needs (B={batch_size}, "
                            f"T={seq_len}, {world_size} rank(s)); the largest, {self.paths[largest]}, "
                            f"has {self._sizes[largest]:,}")
        self._tokens = None
        self.reset()

    def _step_fits(self, step_start: int, shard_size: int) -> bool:
        # Every rank's window (B*T+1 tokens) of this step must fit, so all ranks switch shard together.
        return step_start + self.world * self.B * self.T + 1 <= shard_size

    def _open(self, index: int) -> None:
        self.shard_index = index
        self._tokens = open_tokens(self.paths[index])

    def reset(self) -> None:
        """Back to the start of the first shard, epoch 0."""
        self.epoch = 0
        self._open(0)
        self.position = self.rank * self.B * self.T
        self._skip_until_fits()

    def _skip_until_fits(self) -> None:
        # Ends: __init__ checked that at least one shard fits a step.
        while not self._step_fits(self.position - self.rank * self.B * self.T,
                                  self._sizes[self.shard_index]):
            nxt = self.shard_index + 1
            if nxt == len(self.paths):
                nxt, self.epoch = 0, self.epoch + 1
            self._open(nxt)
            self.position = self.rank * self.B * self.T

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.B * self.T
        buf = np.asarray(self._tokens[self.position:self.position + n + 1], dtype=np.int32)
        x = buf[:-1].reshape(self.B, self.T)  # (B, T)
        y = buf[1:].reshape(self.B, self.T)  # (B, T), the next token of each x
        self.position += n * self.world
        self._skip_until_fits()
        return x, y

    def state(self) -> dict:
        """JSON-able position; load_state(state()) on a fresh loader continues exactly here."""
        return {"shard_index": self.shard_index, "position": self.position, "epoch": self.epoch,
                "shard": self.paths[self.shard_index].name, "num_shards": len(self.paths),
                "batch_size": self.B, "seq_len": self.T, "rank": self.rank, "world_size": self.world}

    def load_state(self, state: dict) -> None:
        """Continue from a state() of a loader over the same shards, with the same B, T, rank, world."""
        try:
            index, position, epoch = int(state["shard_index"]), int(state["position"]), int(state["epoch"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"loader state {state!r}: expected integer shard_index, position, epoch") from None
        saved = (state.get("batch_size"), state.get("seq_len"), state.get("rank", 0), state.get("world_size", 1))
        if saved != (self.B, self.T, self.rank, self.world):
            raise DataError(f"loader state was saved for B={saved[0]}, T={saved[1]}, rank {saved[2]} of "
                            f"{saved[3]}; this run has B={self.B}, T={self.T}, rank {self.rank} of {self.world}")
        name = self.paths[index].name if 0 <= index < len(self.paths) else None
        if name is None or name != state.get("shard", name):
            raise DataError(f"loader state points at shard {state.get('shard')!r} (#{index}), which is not "
                            f"shard #{index} of the {len(self.paths)} now; the data set changed since")
        step_start = position - self.rank * self.B * self.T
        on_boundary = step_start >= 0 and step_start % (self.world * self.B * self.T) == 0
        if not (on_boundary and self._step_fits(step_start, self._sizes[index])):
            raise DataError(f"loader state: position {position:,} is not a step boundary inside "
                            f"{self.paths[index]} ({self._sizes[index]:,} tokens); the shard changed since")
        self._open(index)
        self.position, self.epoch = position, epoch


def eval_batches(paths, batch_size: int, seq_len: int, max_batches: int | None = None,
                 rank: int = 0, world_size: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The validation batches, the same ones every call: from the start of the first shard, at most
    one pass and at most max_batches of them."""
    loader = TokenLoader(paths, batch_size, seq_len, rank=rank, world_size=world_size)
    count = 0
    while (max_batches is None or count < max_batches) and loader.epoch == 0:
        yield loader.next_batch()
        count += 1


def _stream_chunks(paths, chunk: int = 1 << 20) -> Iterator[np.ndarray]:
    for path in resolve_paths(paths):
        tokens = open_tokens(path)
        for i in range(0, tokens.shape[0], chunk):
            yield np.asarray(tokens[i:i + chunk], dtype=np.int32)


def iter_windows(paths, seq_len: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive windows over the concatenated shards (windows cross shard boundaries): the k-th is
    (stream[kT:(k+1)T], stream[kT+1:(k+1)T+1]); the tail that cannot fill a window is dropped."""
    if seq_len <= 0:
        raise DataError(f"sequence length must be positive, got {seq_len}")
    pending = np.zeros(0, dtype=np.int32)
    for chunk in _stream_chunks(paths):
        pending = np.concatenate([pending, chunk])
        count = (pending.size - 1) // seq_len
        for k in range(count):
            w = pending[k * seq_len:(k + 1) * seq_len + 1]
            yield w[:-1], w[1:]
        pending = pending[count * seq_len:]
