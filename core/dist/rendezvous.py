"""A small TCP rendezvous at MASTER_ADDR:MASTER_PORT: rank 0 listens, the others connect.

Rank 0 hands every rank a payload (the NCCL unique id on GPUs); the connections stay open for
barriers and carry the CPU collective (TCPCollective) when there is no NCCL. Messages are
length-prefixed; every wait is bounded by a timeout whose message names the address.
"""

from __future__ import annotations

import socket
import struct
import time

from koifish_core.errors import KoifishError

_LEN = struct.Struct("<Q")  # message length prefix
_HELLO = struct.Struct("<4sII")  # magic, rank, world size: a stray client cannot take a rank's place
_MAGIC = b"KFDP"
MAX_MESSAGE = 1 << 34  # 16 GiB: more is a corrupted length, not a gradient


def send_msg(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_LEN.pack(len(data)) + data)


def recv_msg(sock: socket.socket, where: str = "rendezvous") -> bytes:
    (n,) = _LEN.unpack(recv_exact(sock, _LEN.size, where))
    if n > MAX_MESSAGE:
        raise KoifishError(f"{where}: a peer announced a {n}-byte message; is another program on this port?")
    return recv_exact(sock, n, where)


def recv_exact(sock: socket.socket, n: int, where: str = "rendezvous") -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:  # each recv either makes progress, ends the loop, or times out
        try:
            k = sock.recv_into(view[got:], min(n - got, 1 << 22))
        except socket.timeout:
            raise KoifishError(f"{where}: a peer sent nothing for {sock.gettimeout():.0f} s "
                               "(did another rank stop or hang?)") from None
        except OSError as e:
            raise KoifishError(f"{where}: connection lost ({e.strerror or e}); did another rank fail?") from None
        if k == 0:
            raise KoifishError(f"{where}: a peer closed its connection (did another rank fail?)")
        got += k
    return bytes(buf)


class Rendezvous:
    """Meet at env.master_addr:env.master_port. On rank 0 `peers` holds one socket per other rank
    (index rank-1); elsewhere `server` is the socket to rank 0. `payload` is rank 0's payload on
    every rank afterwards."""

    def __init__(self, env, payload: bytes | None = None, timeout: float = 120.0):
        self.env, self.peers, self.server = env, [], None
        self.where = f"rendezvous at {env.master_addr}:{env.master_port}"
        self.timeout = timeout
        self.payload = payload or b""
        if env.world_size == 1:
            return
        if env.rank == 0:
            self._serve(payload or b"")
        else:
            self._join()

    def _serve(self, payload: bytes) -> None:
        env, deadline = self.env, time.monotonic() + self.timeout
        try:
            listener = socket.create_server((env.master_addr, env.master_port))
        except OSError as e:
            raise KoifishError(f"{self.where}: rank 0 cannot listen ({e.strerror or e}); "
                               "is the port taken? set MASTER_PORT") from None
        by_rank: dict[int, socket.socket] = {}
        try:
            while len(by_rank) < env.world_size - 1:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout
                listener.settimeout(left)
                conn, _ = listener.accept()
                conn.settimeout(max(deadline - time.monotonic(), 0.1))  # a silent stranger must not stall us
                try:
                    rank = self._greeting(conn)
                except KoifishError:
                    conn.close()  # the refused rank learns at once instead of at its timeout
                    raise
                conn.settimeout(self.timeout)
                if rank is None or rank in by_rank:
                    conn.close()  # not one of ours, or a duplicate: keep waiting for the real rank
                    continue
                by_rank[rank] = conn
        except (socket.timeout, KoifishError) as e:
            for conn in by_rank.values():
                conn.close()
            if isinstance(e, KoifishError):
                raise
            missing = sorted(set(range(1, env.world_size)) - set(by_rank))
            raise KoifishError(f"{self.where}: ranks {missing} did not arrive within {self.timeout:.0f} s "
                               f"({len(by_rank) + 1} of {env.world_size} here)") from None
        finally:
            listener.close()
        self.peers = [by_rank[r] for r in range(1, env.world_size)]
        for conn in self.peers:
            send_msg(conn, payload)

    def _greeting(self, conn: socket.socket) -> int | None:
        try:
            magic, rank, world = _HELLO.unpack(recv_exact(conn, _HELLO.size, self.where))
        except KoifishError:
            return None
        if magic != _MAGIC or not 0 < rank < self.env.world_size:
            return None
        if world != self.env.world_size:
            raise KoifishError(f"{self.where}: rank {rank} was started for {world} processes, "
                               f"rank 0 for {self.env.world_size}")
        return rank

    def _join(self) -> None:
        env, deadline = self.env, time.monotonic() + self.timeout
        while True:  # rank 0 may not listen yet: retry until the deadline
            try:
                left = max(deadline - time.monotonic(), 0.1)
                self.server = socket.create_connection((env.master_addr, env.master_port), timeout=left)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    raise KoifishError(f"{self.where}: rank {env.rank} cannot reach rank 0 within "
                                       f"{self.timeout:.0f} s; check MASTER_ADDR and MASTER_PORT") from None
                time.sleep(0.1)
        self.server.settimeout(self.timeout)
        self.server.sendall(_HELLO.pack(_MAGIC, env.rank, env.world_size))
        self.payload = recv_msg(self.server, self.where)

    def barrier(self) -> None:
        """Every rank waits here until all have arrived (rank 0 collects, then releases)."""
        if self.env.world_size == 1:
            return
        if self.env.rank == 0:
            for conn in self.peers:
                recv_msg(conn, self.where)
            for conn in self.peers:
                send_msg(conn, b"")
        else:
            send_msg(self.server, b"")
            recv_msg(self.server, self.where)

    def close(self) -> None:
        for s in self.peers + ([self.server] if self.server else []):
            s.close()
        self.peers, self.server = [], None

    def __enter__(self) -> "Rendezvous":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
