"""Collectives against float64 NumPy: threads (the test double) and TCP over loopback give every
rank the same mean, reduce-scatter, all-gather and broadcast. NCCL needs GPUs (not tested here)."""

import threading

import numpy as np
import pytest

from koifish_core.dist.collective import SingleProcess, TCPCollective, ThreadCollective
from koifish_core.dist.launch_env import DistEnv
from koifish_core.dist.rendezvous import Rendezvous
from koifish_core.dist.spawn import free_port
from koifish_core.errors import KoifishError


def _inputs(world, n=24, dtype=np.float32):
    rng = np.random.default_rng(world)
    return [rng.standard_normal(n).astype(dtype) for _ in range(world)]


def _thread_handles(world):
    shared = ThreadCollective(world, timeout=20)
    return [shared.for_rank(r) for r in range(world)]


def _tcp_handles(world):
    """TCP collectives for `world` ranks, built concurrently (the rendezvous blocks)."""
    port, out = free_port(), {}

    def make(r):
        out[r] = TCPCollective(Rendezvous(DistEnv(r, world, r, "127.0.0.1", port, "test"), timeout=10))

    threads = [threading.Thread(target=make, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join(20) for t in threads]
    return [out[r] for r in range(world)]


def _each_rank(handles, body):
    results, errors = {}, {}

    def run(r):
        try:
            results[r] = body(handles[r], r)
        except Exception as e:  # noqa: BLE001  (re-raised below)
            errors[r] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(handles))]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    if errors:
        raise errors[min(errors)]
    return [results[r] for r in range(len(handles))]


KINDS = {"threads": _thread_handles, "tcp": _tcp_handles}


@pytest.fixture(params=[("threads", 2), ("threads", 4), ("tcp", 3)], ids=lambda p: f"{p[0]}-{p[1]}")
def handles(request):
    kind, world = request.param
    hs = KINDS[kind](world)
    yield hs
    for h in hs:
        if hasattr(h, "rdv"):
            h.rdv.close()


def test_all_reduce_mean(handles):
    world = len(handles)
    xs = _inputs(world)
    want = np.mean(np.stack(xs).astype(np.float64), axis=0)
    outs = _each_rank(handles, lambda h, r: (h.all_reduce_mean(a := xs[r].copy()), a)[1])
    for a in outs:
        assert a.dtype == np.float32
        assert np.allclose(a, want, rtol=1e-6, atol=1e-7)
        assert np.array_equal(a, outs[0])  # the same bits everywhere: parameters cannot drift apart


def test_all_reduce_of_a_view_writes_through(handles):
    world = len(handles)
    xs = _inputs(world, n=30)
    want = np.mean(np.stack(xs).astype(np.float64), axis=0)

    def body(h, r):
        a = xs[r].copy()
        h.all_reduce_mean(a[10:20])  # one bucket of a flat gradient
        return a

    for r, a in enumerate(_each_rank(handles, body)):
        assert np.allclose(a[10:20], want[10:20], rtol=1e-6)
        assert np.array_equal(a[:10], xs[r][:10]) and np.array_equal(a[20:], xs[r][20:])


def test_reduce_scatter_then_all_gather_is_all_reduce(handles):
    world = len(handles)
    n = 8 * world
    xs = _inputs(world, n=n)
    want = np.mean(np.stack(xs).astype(np.float64), axis=0)

    def body(h, r):
        shard = np.empty(n // world, np.float32)
        h.reduce_scatter_mean(xs[r], shard)
        full = np.zeros(n, np.float32)
        h.all_gather(shard, full)
        return shard, full

    for r, (shard, full) in enumerate(_each_rank(handles, body)):
        S = n // world
        assert np.allclose(shard, want[r * S:(r + 1) * S], rtol=1e-6, atol=1e-7)
        assert np.allclose(full, want, rtol=1e-6, atol=1e-7)


def test_all_gather_places_each_rank_s_shard(handles):
    world = len(handles)

    def body(h, r):
        full = np.zeros(3 * world, np.int64)
        h.all_gather(np.full(3, r, np.int64), full)
        return full

    for full in _each_rank(handles, body):
        assert np.array_equal(full, np.repeat(np.arange(world), 3))


@pytest.mark.parametrize("root", [0, 1])
def test_broadcast(handles, root):
    outs = _each_rank(handles, lambda h, r: (h.broadcast(a := np.full(5, float(r), np.float64), root=root), a)[1])
    assert all(np.array_equal(a, np.full(5, float(root))) for a in outs)


def test_barrier(handles):
    order = []

    def body(h, r):
        order.append(("before", r))
        h.barrier()
        order.append(("after", r))

    _each_rank(handles, body)
    kinds = [k for k, _ in order]
    assert kinds == ["before"] * len(handles) + ["after"] * len(handles)


def test_shards_must_be_equal(handles):
    with pytest.raises(KoifishError, match="do not split into"):
        _each_rank(handles, lambda h, r: h.reduce_scatter_mean(np.zeros(len(handles) * 2 + 1, np.float32),
                                                               np.zeros(2, np.float32)))


def test_single_process_is_the_identity():
    sp, a = SingleProcess(), np.arange(6, dtype=np.float32)
    sp.all_reduce_mean(a)
    shard = np.empty(6, np.float32)
    sp.reduce_scatter_mean(a, shard)
    full = np.empty(6, np.float32)
    sp.all_gather(shard, full)
    sp.broadcast(a)
    sp.barrier()
    assert np.array_equal(a, np.arange(6)) and np.array_equal(full, a)


def test_a_failed_thread_rank_releases_the_others():
    shared = ThreadCollective(2, timeout=20)

    def body(h, r):
        if r == 1:
            shared.abort()  # what a rank does when its step raised
            return None
        h.all_reduce_mean(np.zeros(2, np.float32))

    with pytest.raises(KoifishError, match="another rank failed"):
        _each_rank([shared.for_rank(0), shared.for_rank(1)], body)
