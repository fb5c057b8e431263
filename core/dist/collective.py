"""Collectives: how ranks average their gradients.

    SingleProcess    one rank: nothing to do
    ThreadCollective N ranks as threads of one process (the test double)
    TCPCollective    N processes on CPUs, through rank 0 over the rendezvous sockets
    NCCLCollective   N processes on GPUs, through NCCL (cupy.cuda.nccl)
Each has all_reduce_mean(array) (in place, same result on every rank) and barrier().
"""

from __future__ import annotations

import threading

import numpy as np


class SingleProcess:
    rank, world_size = 0, 1

    def all_reduce_mean(self, array) -> None:
        pass

    def barrier(self) -> None:
        pass


class ThreadCollective:
    """Shared state for `world_size` threads; `for_rank(r)` gives each thread its handle."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size)
        self._slots: list = [None] * world_size

    def for_rank(self, rank: int) -> "_ThreadRank":
        return _ThreadRank(self, rank)


class _ThreadRank:
    def __init__(self, shared: ThreadCollective, rank: int):
        self.shared, self.rank, self.world_size = shared, rank, shared.world_size

    def all_reduce_mean(self, array) -> None:
        s = self.shared
        s._slots[self.rank] = array.copy()
        s._barrier.wait()
        # every rank sums in the same order, so every rank gets the same bits
        total = s._slots[0].astype(np.float64)
        for other in s._slots[1:]:
            total += other
        s._barrier.wait()
        array[...] = (total / self.world_size).astype(array.dtype)

    def barrier(self) -> None:
        self.shared._barrier.wait()


class TCPCollective:
    """Rank 0 gathers, sums in rank order, and sends the mean back (a star: fine for the CPU
    models this path trains; GPUs use NCCL)."""

    def __init__(self, rendezvous):
        from koifish_core.dist.rendezvous import recv_msg, send_msg

        self.rdv, self.rank, self.world_size = rendezvous, rendezvous.env.rank, rendezvous.env.world_size
        self._send, self._recv = send_msg, recv_msg

    def all_reduce_mean(self, array) -> None:
        if self.world_size == 1:
            return
        if self.rank == 0:
            total = array.astype(np.float64)
            for conn in self.rdv.peers:
                total += np.frombuffer(self._recv(conn), dtype=array.dtype).reshape(array.shape)
            mean = (total / self.world_size).astype(array.dtype)
            for conn in self.rdv.peers:
                self._send(conn, mean.tobytes())
            array[...] = mean
        else:
            self._send(self.rdv.server, np.ascontiguousarray(array).tobytes())
            array[...] = np.frombuffer(self._recv(self.rdv.server), dtype=array.dtype).reshape(array.shape)

    def barrier(self) -> None:
        self.all_reduce_mean(np.zeros(1, np.float32))


class NCCLCollective:
    """NCCL through CuPy; the unique id travels through the TCP rendezvous. Runs only on a machine
    with several GPUs (none was lent while this was written: untested there)."""

    def __init__(self, rendezvous, stream=None):
        from cupy.cuda import nccl

        self.nccl, self.rank, self.world_size = nccl, rendezvous.env.rank, rendezvous.env.world_size
        uid = tuple(np.frombuffer(rendezvous.payload, dtype=np.int8).tolist())  # NCCL's id is a char array
        self.comm = nccl.NcclCommunicator(self.world_size, uid, self.rank)
        self.stream = stream

    @staticmethod
    def unique_id() -> bytes:
        from cupy.cuda import nccl

        return np.array(nccl.get_unique_id(), dtype=np.int8).tobytes()

    def all_reduce_mean(self, array) -> None:
        nccl = self.nccl
        ptr = self.stream.ptr if self.stream is not None else 0
        self.comm.allReduce(array.data.ptr, array.data.ptr, array.size, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, ptr)
        array *= 1.0 / self.world_size

    def barrier(self) -> None:
        import cupy as cp

        self.all_reduce_mean(cp.zeros(1, cp.float32))
