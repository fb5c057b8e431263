"""How data-parallel work is divided, as pure functions: rows of the global batch, gradient
buckets for overlapping the all-reduce with backward, and ZeRO-1 shards of the flat arrays.

Every rank reads the SAME global window from one TokenLoader and keeps its rows, so the data
position (and hence every checkpoint) does not depend on the number of ranks, and the mean over
ranks of the per-rank mean gradients is the single-process gradient of the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from koifish_core.errors import KoifishError

DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024  # PyTorch DDP's default: big enough to reach NCCL's bandwidth


# ---- rows of the global batch ------------------------------------------------------------------


def rank_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """Rows of a global batch of `batch_size` that `rank` trains on: r*B/N .. (r+1)*B/N."""
    if not 0 <= rank < world_size:
        raise KoifishError(f"data parallel: rank {rank} is outside a world of {world_size}")
    if batch_size % world_size:
        raise KoifishError(f"data.batch_size {batch_size} does not split evenly over {world_size} ranks; "
                           f"choose a multiple of {world_size}")
    per = batch_size // world_size
    return slice(rank * per, (rank + 1) * per)


def rank_batches(batches, rank: int, world_size: int) -> list:
    """This rank's rows of every (x, y) micro-batch read from the shared loader."""
    if world_size == 1:
        return list(batches)
    out = []
    for x, y in batches:
        rows = rank_rows(x.shape[0], rank, world_size)
        out.append((x[rows], y[rows]))
    return out


# ---- the flat layout ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpan:
    name: str
    """Parameter name (as in GPT2.param_views())."""
    start: int
    """First element in the flat parameter/gradient array."""
    stop: int
    """One past the last element."""

    @property
    def size(self) -> int:
        return self.stop - self.start


def flat_layout(views: dict[str, np.ndarray], flat: np.ndarray) -> list[TensorSpan]:
    """Where each named view lies in `flat` (views in parameter order, as param_views() gives)."""
    base = flat.__array_interface__["data"][0]
    spans = []
    for name, view in views.items():
        offset, rem = divmod(view.__array_interface__["data"][0] - base, flat.itemsize)
        if rem or offset < 0 or offset + view.size > flat.size or not view.flags.c_contiguous:
            raise KoifishError(f"data parallel: tensor {name} is not a contiguous piece of the flat array")
        spans.append(TensorSpan(name, offset, offset + view.size))
    return spans


# ---- gradient buckets --------------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    start: int
    """First element of the bucket in the flat gradient."""
    stop: int
    """One past its last element (buckets are contiguous: whole tensors, neighbours in the flat array)."""
    names: tuple[str, ...]
    """Its tensors, in the order backward finishes them (last layer first)."""

    @property
    def size(self) -> int:
        return self.stop - self.start


def bucket_plan(spans: list[TensorSpan], itemsize: int = 4, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[Bucket]:
    """Buckets of about `bucket_bytes` over the flat gradient, in reverse parameter order.

    Backward produces gradients from the last layer to the first, so the first bucket is ready
    first and its all-reduce runs while backward continues. Tensors are never split (a bucket is
    ready when its last tensor is); a tensor larger than the cap gets a bucket of its own. Every
    rank must issue the buckets in this order: NCCL pairs calls by order, not by name.
    """
    if bucket_bytes <= 0:
        raise KoifishError(f"data parallel: bucket size must be positive, got {bucket_bytes} bytes")
    ordered = sorted(spans, key=lambda s: s.start, reverse=True)
    for later, earlier in zip(ordered, ordered[1:]):
        if earlier.stop != later.start:
            raise KoifishError(f"data parallel: tensors {earlier.name} and {later.name} are not adjacent in the "
                               "flat gradient; buckets need one contiguous array")
    cap = max(bucket_bytes // itemsize, 1)
    buckets, current = [], []
    for span in ordered:
        if current and sum(s.size for s in current) + span.size > cap:
            buckets.append(_bucket(current))
            current = []
        current.append(span)
    if current:
        buckets.append(_bucket(current))
    return buckets


def _bucket(spans: list[TensorSpan]) -> Bucket:
    return Bucket(spans[-1].start, spans[0].stop, tuple(s.name for s in spans))


def all_reduce_buckets(collective, flat: np.ndarray, buckets: list[Bucket]) -> None:
    """The bucketed all-reduce done one bucket after another (what the CPU and the tests use; the
    GPU engine queues the same buckets on NCCL as backward finishes them)."""
    for b in buckets:
        collective.all_reduce_mean(flat[b.start:b.stop])


# ---- ZeRO-1 shards -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPlan:
    """ZeRO-1: rank r owns elements [r*S, (r+1)*S) of the flat parameter, gradient and optimizer
    arrays, S = ceil(n / world). Arrays are padded to world*S so every shard has the same size,
    as NCCL's reduce-scatter and all-gather require; the padding is zero and never trained."""

    n: int
    """Elements in the flat parameter array."""
    world_size: int
    """Number of ranks."""

    @property
    def shard_size(self) -> int:
        return -(-self.n // self.world_size)

    @property
    def padded(self) -> int:
        return self.shard_size * self.world_size

    def bounds(self, rank: int) -> tuple[int, int]:
        """[start, stop) of rank's shard in the padded array."""
        if not 0 <= rank < self.world_size:
            raise KoifishError(f"data parallel: rank {rank} is outside a world of {self.world_size}")
        return rank * self.shard_size, (rank + 1) * self.shard_size

    def owned(self, rank: int) -> tuple[int, int]:
        """[start, stop) of the real (unpadded) elements rank owns; empty for a rank past the end."""
        lo, hi = self.bounds(rank)
        return min(lo, self.n), min(hi, self.n)

    def pad(self, flat: np.ndarray) -> np.ndarray:
        """A padded copy of `flat` (zeros after n)."""
        if flat.size != self.n:
            raise KoifishError(f"data parallel: expected {self.n} elements, got {flat.size}")
        out = np.zeros(self.padded, dtype=flat.dtype)
        out[:self.n] = flat
        return out
