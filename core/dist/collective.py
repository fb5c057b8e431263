"""Collectives: how ranks combine their gradients.

    SingleProcess    one rank: nothing to do
    ThreadCollective N ranks as threads of one process (the test double)
    TCPCollective    N processes on CPUs, through rank 0 over the rendezvous sockets
    NCCLCollective   N processes on GPUs, through NCCL (cupy.cuda.nccl)

Every collective gives every rank the same bits: the CPU ones sum in rank order in float64.
ZeRO-1 needs the flat array's length to be a multiple of the world size (see data_parallel.ShardPlan).
"""

from __future__ import annotations

import threading
from typing import Protocol

import numpy as np

from koifish_core.errors import KoifishError


class Collective(Protocol):
    rank: int
    world_size: int

    def all_reduce_mean(self, array) -> None:
        """In place: the element-wise mean of `array` over all ranks."""

    def reduce_scatter_mean(self, full, shard) -> None:
        """shard[:] = mean over ranks of full[rank*S:(rank+1)*S], S = full.size // world_size."""

    def all_gather(self, shard, full) -> None:
        """full[r*S:(r+1)*S] = rank r's shard, on every rank."""

    def broadcast(self, array, root: int = 0) -> None:
        """In place: every rank gets `root`'s array."""

    def barrier(self) -> None:
        """Return once every rank has called it."""


def _shard_size(full, world: int) -> int:
    if full.size % world:
        raise KoifishError(f"collective: {full.size} elements do not split into {world} equal shards; "
                           "pad the flat array (data_parallel.ShardPlan.padded)")
    return full.size // world


def _mean_of(parts, dtype):
    total = parts[0].astype(np.float64)
    for other in parts[1:]:  # rank order: every rank gets the same bits
        total += other
    return (total / len(parts)).astype(dtype)


class SingleProcess:
    rank, world_size = 0, 1

    def all_reduce_mean(self, array) -> None:
        pass

    def reduce_scatter_mean(self, full, shard) -> None:
        shard[...] = full.reshape(shard.shape)

    def all_gather(self, shard, full) -> None:
        full[...] = shard.reshape(full.shape)

    def broadcast(self, array, root: int = 0) -> None:
        pass

    def barrier(self) -> None:
        pass


class ThreadCollective:
    """Shared state for `world_size` threads; `for_rank(r)` gives each thread its handle. A rank
    that fails should call `abort()` so that the others stop waiting (they raise KoifishError)."""

    def __init__(self, world_size: int, timeout: float = 300.0):
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout)
        self._slots: list = [None] * world_size

    def for_rank(self, rank: int) -> "ThreadRank":
        return ThreadRank(self, rank)

    def abort(self) -> None:
        self._barrier.abort()

    def wait(self) -> None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise KoifishError("thread collective: another rank failed or timed out") from None


class ThreadRank:
    """One thread's view of a ThreadCollective. Each call: publish, wait, read, wait (the second
    wait keeps a fast rank from overwriting its slot while a slow one still reads it)."""

    def __init__(self, shared: ThreadCollective, rank: int):
        self.shared, self.rank, self.world_size = shared, rank, shared.world_size

    def _exchange(self, value) -> list:
        s = self.shared
        s._slots[self.rank] = value
        s.wait()
        return list(s._slots)

    def all_reduce_mean(self, array) -> None:
        parts = self._exchange(array)
        mean = _mean_of(parts, array.dtype)
        self.shared.wait()
        array[...] = mean

    def reduce_scatter_mean(self, full, shard) -> None:
        n = _shard_size(full, self.world_size)
        lo = self.rank * n
        parts = [p[lo:lo + n] for p in self._exchange(full.reshape(-1))]
        mean = _mean_of(parts, shard.dtype)
        self.shared.wait()
        shard[...] = mean.reshape(shard.shape)

    def all_gather(self, shard, full) -> None:
        parts = [p.copy() for p in self._exchange(shard.reshape(-1))]
        self.shared.wait()
        full[...] = np.concatenate(parts).reshape(full.shape)

    def broadcast(self, array, root: int = 0) -> None:
        value = self._exchange(array)[root].copy()
        self.shared.wait()
        array[...] = value

    def barrier(self) -> None:
        self.shared.wait()


class TCPCollective:
    """Rank 0 gathers, combines in rank order and sends the result back: a star, fine for the CPU
    models this path trains (GPUs use NCCL). Rides on an open Rendezvous's sockets."""

    def __init__(self, rendezvous):
        from koifish_core.dist.rendezvous import recv_msg, send_msg

        self.rdv, self.rank, self.world_size = rendezvous, rendezvous.env.rank, rendezvous.env.world_size
        self._send = send_msg
        self._recv = lambda sock: recv_msg(sock, rendezvous.where)

    def _gather(self, array) -> list | None:
        """Rank 0: every rank's array (flat, rank order); others: None after sending theirs."""
        flat = np.ascontiguousarray(array).reshape(-1)
        if self.rank != 0:
            self._send(self.rdv.server, flat.tobytes())
            return None
        return [flat] + [np.frombuffer(self._recv(c), dtype=flat.dtype) for c in self.rdv.peers]

    def _scatter_back(self, result, out) -> None:
        """Rank 0 sends `result` to every rank; every rank writes what it gets into `out`."""
        if self.rank == 0:
            data = np.ascontiguousarray(result).tobytes()
            for conn in self.rdv.peers:
                self._send(conn, data)
        else:
            result = np.frombuffer(self._recv(self.rdv.server), dtype=out.dtype)
        out[...] = np.asarray(result).reshape(out.shape)

    def all_reduce_mean(self, array) -> None:
        if self.world_size == 1:
            return
        parts = self._gather(array)
        self._scatter_back(_mean_of(parts, array.dtype) if parts else None, array)

    def reduce_scatter_mean(self, full, shard) -> None:
        n = _shard_size(full, self.world_size)
        mean = full.reshape(-1).copy()
        self.all_reduce_mean(mean)
        shard[...] = mean[self.rank * n:(self.rank + 1) * n].reshape(shard.shape)

    def all_gather(self, shard, full) -> None:
        parts = self._gather(shard)
        self._scatter_back(np.concatenate(parts) if parts else None, full)

    def broadcast(self, array, root: int = 0) -> None:
        if self.world_size == 1:
            return
        parts = self._gather(array)
        self._scatter_back(parts[root] if parts else None, array)

    def barrier(self) -> None:
        self.rdv.barrier()


class NCCLCollective:
    """NCCL through CuPy; the unique id travels through the TCP rendezvous. Arrays are CuPy arrays
    on this rank's GPU. Written against cupy.cuda.nccl's documented API; no machine with several
    GPUs was lent while it was written; docs/distributed.md says what has run since.

    `stream`: the CuPy stream the engine computes on. Set it (collective.stream = engine.stream)
    so collectives queue behind backward without a host sync; while it is None every call
    synchronizes the device before and after, which is correct on any stream but slower.
    """

    def __init__(self, rendezvous, stream=None):
        import cupy as cp
        from cupy.cuda import nccl

        self.cp, self.nccl = cp, nccl
        self.rank, self.world_size = rendezvous.env.rank, rendezvous.env.world_size
        try:  # CuPy 14 takes NCCL's id (a char[128]) as bytes, earlier versions as a tuple of ints
            self.comm = nccl.NcclCommunicator(self.world_size, bytes(rendezvous.payload), self.rank)
        except TypeError:
            uid = tuple(np.frombuffer(rendezvous.payload, dtype=np.int8).tolist())
            self.comm = nccl.NcclCommunicator(self.world_size, uid, self.rank)
        self.stream = stream
        self.comm_stream = cp.cuda.Stream(non_blocking=True)  # buckets overlap backward on this one
        self._avg = getattr(nccl, "NCCL_AVG", None)  # NCCL >= 2.10 divides inside the reduction

    @staticmethod
    def unique_id() -> bytes:
        from cupy.cuda import nccl

        uid = nccl.get_unique_id()
        return bytes(uid) if isinstance(uid, (bytes, bytearray)) else np.array(uid, dtype=np.int8).tobytes()

    def _dtype(self, array) -> int:
        nccl = self.nccl
        table = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64, "float16": nccl.NCCL_FLOAT16,
                 "int32": nccl.NCCL_INT32, "int64": nccl.NCCL_INT64, "int8": nccl.NCCL_INT8,
                 "uint8": nccl.NCCL_UINT8, "bfloat16": getattr(nccl, "NCCL_BFLOAT16", 9)}
        if array.dtype.name not in table:
            raise KoifishError(f"NCCL collective: no NCCL type for {array.dtype}")
        return table[array.dtype.name]

    def _run(self, launch, mean_of=None) -> None:
        """launch(stream_ptr) queues NCCL work ordered behind the compute stream; `mean_of` is
        divided by the world size afterwards where NCCL has no AVG."""
        stream = self.stream
        if stream is None:
            self.cp.cuda.Device().synchronize()
            stream = self.comm_stream
        launch(stream.ptr)
        if mean_of is not None and self._avg is None:
            with stream:
                mean_of *= 1.0 / self.world_size
        if self.stream is None:
            stream.synchronize()

    def _mean_op(self) -> int:
        return self._avg if self._avg is not None else self.nccl.NCCL_SUM

    def _through_gpu(self, array: np.ndarray, op) -> None:
        """op on a GPU copy of host values (the trainer's stop flag), copied back in place."""
        on_gpu = self.cp.asarray(array)
        op(on_gpu)
        array[...] = on_gpu.get(stream=self.stream or self.comm_stream)

    def all_reduce_mean(self, array) -> None:
        if isinstance(array, np.ndarray):
            return self._through_gpu(array, self.all_reduce_mean)
        ptr, dt = array.data.ptr, self._dtype(array)
        self._run(lambda s: self.comm.allReduce(ptr, ptr, array.size, dt, self._mean_op(), s), array)

    def reduce_scatter_mean(self, full, shard) -> None:
        n = _shard_size(full, self.world_size)
        dt = self._dtype(full)
        self._run(lambda s: self.comm.reduceScatter(full.data.ptr, shard.data.ptr, n, dt, self._mean_op(), s), shard)

    def all_gather(self, shard, full) -> None:
        dt = self._dtype(shard)
        self._run(lambda s: self.comm.allGather(shard.data.ptr, full.data.ptr, shard.size, dt, s))

    def broadcast(self, array, root: int = 0) -> None:
        if isinstance(array, np.ndarray):
            return self._through_gpu(array, lambda a: self.broadcast(a, root))
        ptr, dt = array.data.ptr, self._dtype(array)
        self._run(lambda s: self.comm.broadcast(ptr, ptr, array.size, dt, root, s))

    def barrier(self) -> None:
        flag = self.cp.zeros(1, self.cp.float32)
        self.all_reduce_mean(flag)
        (self.stream or self.comm_stream).synchronize()

    # ---- buckets that overlap backward --------------------------------------------------------
    def start_bucket(self, flat, start: int, stop: int, ready=None) -> None:
        """Queue the mean of flat[start:stop] on the communication stream once `ready` (a CuPy
        event the engine records on its stream after backward wrote those gradients) has fired;
        backward goes on meanwhile. Call in plan order on every rank (NCCL matches calls by order)."""
        if ready is not None:
            self.comm_stream.wait_event(ready)
        part = flat[start:stop]
        self.comm.allReduce(part.data.ptr, part.data.ptr, part.size, self._dtype(part), self._mean_op(),
                            self.comm_stream.ptr)
        if self._avg is None:
            with self.comm_stream:
                part *= 1.0 / self.world_size

    def finish_buckets(self, stream) -> None:
        """Make `stream` (the engine's) wait for every queued bucket before the norm and update."""
        stream.wait_event(self.comm_stream.record())

    def close(self) -> None:
        self.comm.destroy()
