"""The TCP rendezvous over loopback: payload to every rank, barriers, bounded waits."""

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from koifish_core.dist.launch_env import DistEnv
from koifish_core.dist.rendezvous import Rendezvous, recv_msg, send_msg
from koifish_core.dist.spawn import free_port
from koifish_core.errors import KoifishError

PAYLOAD = bytes(range(256)) * 2  # NCCL's id is 128 bytes; any bytes must travel unchanged


def _env(rank, world, port):
    return DistEnv(rank, world, rank, "127.0.0.1", port, "test")


def _run_ranks(world, body, timeout=20):
    """body(rank) in one thread per rank; returns {rank: result}; re-raises the lowest rank's error
    (rank 0 sees the cause; the others see rank 0 hang up)."""
    results, errors = {}, {}

    def run(r):
        try:
            results[r] = body(r)
        except Exception as e:  # noqa: BLE001  (re-raised below)
            errors[r] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join(timeout) for t in threads]
    if errors:
        raise errors[min(errors)]
    assert len(results) == world
    return results


def test_three_ranks_as_threads_get_rank_0s_payload():
    port = free_port()

    def body(r):
        with Rendezvous(_env(r, 3, port), PAYLOAD if r == 0 else b"ignored", timeout=10) as rdv:
            return rdv.payload

    assert _run_ranks(3, body) == {0: PAYLOAD, 1: PAYLOAD, 2: PAYLOAD}


def test_three_ranks_as_processes_get_the_payload_and_pass_barriers(tmp_path):
    port = free_port()
    script = tmp_path / "rank.py"
    script.write_text(
        "import sys, json, time\n"
        "from koifish_core.dist.launch_env import DistEnv\n"
        "from koifish_core.dist.rendezvous import Rendezvous\n"
        "r, port = int(sys.argv[1]), int(sys.argv[2])\n"
        "if r == 0: time.sleep(0.5)  # the others must retry until rank 0 listens\n"
        "rdv = Rendezvous(DistEnv(r, 3, r, '127.0.0.1', port, 'test'), b'uid-' + bytes([7, 0, 255]) if r == 0 else None,"
        " timeout=20)\n"
        "arrive, leave = [], []\n"
        "for i in range(3):\n"
        "    time.sleep(0.1 * ((r + i) % 3))  # a different rank is last each time\n"
        "    arrive.append(time.time()); rdv.barrier(); leave.append(time.time())\n"
        "rdv.close()\n"
        "print(json.dumps({'payload': list(rdv.payload), 'arrive': arrive, 'leave': leave}))\n")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(port)], stdout=subprocess.PIPE, text=True)
             for r in range(3)]
    outs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert all(bytes(o["payload"]) == b"uid-\x07\x00\xff" for o in outs)
    for i in range(3):  # nobody leaves barrier i before the last rank has arrived at it
        assert min(o["leave"][i] for o in outs) >= max(o["arrive"][i] for o in outs)


def test_single_process_needs_no_network():
    rdv = Rendezvous(DistEnv(), b"x")
    assert rdv.payload == b"x"
    rdv.barrier()
    rdv.close()


def test_a_rank_that_never_comes_is_named_with_the_address():
    port = free_port()
    with pytest.raises(KoifishError, match=rf"127.0.0.1:{port}: ranks \[2\] did not arrive within 1 s"):
        _run_ranks(2, lambda r: Rendezvous(_env(r, 3, port), timeout=1.0) if r == 0 else
                   Rendezvous(_env(1, 3, port), timeout=1.0))


def test_no_rank_0_times_out_with_the_address():
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(KoifishError, match=rf"127.0.0.1:{port}: rank 1 cannot reach rank 0 within 1 s"):
        Rendezvous(_env(1, 2, port), timeout=1.0)
    assert time.monotonic() - t0 < 5


def test_a_stranger_on_the_port_does_not_take_a_rank_s_place():
    port = free_port()

    def body(r):
        if r == 1:  # a program that connects and sends junk, then the real rank 1
            time.sleep(0.2)
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                time.sleep(0.2)
            return Rendezvous(_env(1, 2, port), timeout=10).payload
        return Rendezvous(_env(0, 2, port), b"id", timeout=10).payload

    assert _run_ranks(2, body) == {0: b"id", 1: b"id"}


def test_ranks_started_for_different_world_sizes_are_refused():
    port = free_port()
    with pytest.raises(KoifishError, match="rank 1 was started for 3 processes, rank 0 for 2"):
        _run_ranks(2, lambda r: Rendezvous(_env(0, 2, port), timeout=3) if r == 0 else
                   Rendezvous(_env(1, 3, port), timeout=3))


def test_messages_are_length_prefixed_and_a_closed_peer_is_explained():
    a, b = socket.socketpair()
    send_msg(a, b"")
    send_msg(a, b"x" * 100_000)
    assert recv_msg(b) == b"" and recv_msg(b) == b"x" * 100_000
    a.close()
    with pytest.raises(KoifishError, match="closed its connection"):
        recv_msg(b)
    b.close()
