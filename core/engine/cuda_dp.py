"""Data parallelism inside the CUDA engine: gradient buckets all-reduced while backward runs, and
ZeRO-1 (AdamW's moments sharded over the ranks).

Buckets overlap backward inside the captured micro-batch graph: when backward has written the
last tensor of a bucket, an event recorded on the compute stream releases the bucket's NCCL
all-reduce on the collective's communication stream, and the compute stream joins that stream
before the graph ends. NCCL calls are captured like kernels, so a replay costs no Python. Only the
last micro-batch of a step carries the all-reduces (accumulation adds into the gradients first).

The plan (data_parallel.bucket_plan) is the same on every rank and issued in the same order:
NCCL pairs calls by order. Readiness follows backward: ln_f first, then block L-1 ... block 0,
then wpe and wte (wte's gradient gets its last term from the embedding backward).
"""

from __future__ import annotations

from koifish_core.dist.data_parallel import ShardPlan, bucket_plan, flat_layout


def block_of(name: str) -> int | None:
    """The block a parameter belongs to (h.3.attn... -> 3), None for wte, wpe, ln_f."""
    return int(name.split(".")[1]) if name.startswith("h.") else None


class GradSync:
    """Issues the bucket all-reduces of one backward pass as tensors become ready."""

    def __init__(self, collective, spans, bucket_bytes: int, stream):
        import cupy as cp

        self.cp, self.collective, self.stream = cp, collective, stream
        self.buckets = bucket_plan(spans, 4, bucket_bytes)
        self.active = False
        self.events = []  # kept alive while a capture refers to them

    def begin(self, active: bool) -> None:
        self.active, self.ready, self.next = active, set(), 0

    def tensors_ready(self, flat, names) -> None:
        """Backward has finished these tensors' gradients: start every bucket now complete."""
        if not self.active:
            return
        self.ready.update(names)
        while self.next < len(self.buckets) and self.ready.issuperset(self.buckets[self.next].names):
            b = self.buckets[self.next]
            ev = self.cp.cuda.Event(disable_timing=True)
            ev.record(self.stream)
            self.events.append(ev)
            self.collective.start_bucket(flat, b.start, b.stop, ev)
            self.next += 1

    def end(self) -> None:
        if not self.active:
            return
        if self.next != len(self.buckets):  # a bug, not a user error: every gradient must be averaged
            raise RuntimeError(f"gradient buckets left unissued: {self.next} of {len(self.buckets)}")
        self.collective.finish_buckets(self.stream)
        self.active = False


class ZeroShards:
    """ZeRO-1 on the GPU: this rank's slice of the flat (padded) arrays."""

    def __init__(self, n: int, collective):
        self.plan = ShardPlan(n, collective.world_size)
        self.lo, self.hi = self.plan.bounds(collective.rank)


def host_spans(host_model):
    return flat_layout(host_model.param_views(), host_model.params)
