"""A small TCP rendezvous at MASTER_ADDR:MASTER_PORT: rank 0 listens, the others connect.

Rank 0 hands every rank a payload (the NCCL unique id on GPUs); the connections stay open and
carry the CPU collective (TCPCollective) when there is no NCCL. Messages are length-prefixed;
every wait is bounded by a timeout that names the address.
"""

from __future__ import annotations

import socket
import struct
import time

from koifish_core.errors import KoifishError

_LEN = struct.Struct("<Q")


def send_msg(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_LEN.pack(len(data)) + data)


def recv_msg(sock: socket.socket) -> bytes:
    head = _recv_exact(sock, _LEN.size)
    return _recv_exact(sock, _LEN.unpack(head)[0])


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise KoifishError("rendezvous: a peer closed its connection (did another rank fail?)")
        buf += chunk
    return bytes(buf)


class Rendezvous:
    """rank 0: `peers` holds one socket per other rank (index rank-1); others: `server`."""

    def __init__(self, env, payload: bytes | None = None, timeout: float = 120.0):
        self.env, self.peers, self.server = env, [], None
        where = f"{env.master_addr}:{env.master_port}"
        if env.world_size == 1:
            self.payload = payload or b""
            return
        if env.rank == 0:
            listener = socket.create_server((env.master_addr, env.master_port), reuse_port=False)
            listener.settimeout(timeout)
            by_rank = {}
            try:
                while len(by_rank) < env.world_size - 1:
                    conn, _ = listener.accept()
                    conn.settimeout(timeout)
                    by_rank[struct.unpack("<I", _recv_exact(conn, 4))[0]] = conn
            except socket.timeout:
                raise KoifishError(f"rendezvous at {where}: only {len(by_rank) + 1} of {env.world_size} ranks "
                                   f"arrived within {timeout:.0f} s") from None
            finally:
                listener.close()
            self.peers = [by_rank[r] for r in range(1, env.world_size)]
            self.payload = payload or b""
            for conn in self.peers:
                send_msg(conn, self.payload)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    self.server = socket.create_connection((env.master_addr, env.master_port), timeout=timeout)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise KoifishError(f"rendezvous: cannot reach rank 0 at {where} within {timeout:.0f} s") from None
                    time.sleep(0.2)
            self.server.sendall(struct.pack("<I", env.rank))
            self.payload = recv_msg(self.server)

    def close(self) -> None:
        for s in self.peers + ([self.server] if self.server else []):
            s.close()
