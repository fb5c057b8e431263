"""ZeRO-1 (sharded AdamW moments) against the unsharded step: all-reduce, norm, clip, AdamW."""

import threading

import numpy as np
import pytest

from koifish_core.dist.collective import ThreadCollective
from koifish_core.dist.zero1 import Zero1AdamW
from koifish_cuda.adamw import adamw_update_ref, global_norm_ref

HYPER = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
N = 103  # not a multiple of 2, 3 or 4: the last shard is padded


def _rank_grads(step, world):
    rng = np.random.default_rng(100 + step)
    return [rng.standard_normal(N).astype(np.float32) * (1 + r) for r in range(world)]


def _reference(params, steps, world, clip, lr=1e-2):
    """The unsharded data-parallel step (what the CPU engine does with a collective)."""
    p, m, v = params.copy(), np.zeros(N, np.float32), np.zeros(N, np.float32)
    mask = np.arange(N) % 3 != 0
    norms = []
    for step in range(1, steps + 1):
        g = np.mean(np.stack(_rank_grads(step, world)).astype(np.float64), axis=0).astype(np.float32)
        norm = global_norm_ref(g)
        norms.append(norm)
        if clip and norm > clip:
            g *= np.float32(clip / (norm + 1e-6))
        adamw_update_ref(p, g, m, v, mask, step, lr, **HYPER)
    return p, m, v, norms


def _run_zero1(world, params, steps, clip, first_step=1, state=None, lr=1e-2):
    shared = ThreadCollective(world, timeout=20)
    mask = np.arange(N) % 3 != 0
    out = {}

    def rank(r):
        opt = Zero1AdamW(N, shared.for_rank(r), mask)
        if state is not None:
            opt.load_full_state(state)
        p, norms = params.copy(), []
        for step in range(first_step, first_step + steps):
            shard, norm = opt.reduce_gradients(_rank_grads(step, world)[r])
            norms.append(norm)
            opt.update(p, shard, norm, lr, grad_clip=clip, **HYPER)
        out[r] = (p, norms, opt.full_state(), opt.m.size)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    return [out[r] for r in range(world)]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_zero1_step_equals_the_unsharded_step(world, clip):
    params = np.random.default_rng(0).standard_normal(N).astype(np.float32)
    want_p, want_m, want_v, want_norms = _reference(params, 6, world, clip)
    ranks = _run_zero1(world, params, 6, clip)
    for p, norms, state, shard_elems in ranks:
        assert np.array_equal(p, ranks[0][0])  # every rank holds the same parameters
        assert np.allclose(p, want_p, rtol=1e-5, atol=1e-6)
        assert np.allclose(norms, want_norms, rtol=1e-6)
        assert np.allclose(state["m"], want_m, rtol=1e-5, atol=1e-7)
        assert np.allclose(state["v"], want_v, rtol=1e-5, atol=1e-9)
        assert shard_elems == -(-N // world)  # each rank keeps only its share of the moments


def test_zero1_state_saved_with_2_ranks_resumes_with_3():
    params = np.random.default_rng(1).standard_normal(N).astype(np.float32)
    want_p, *_ = _reference(params, 7, 2, 0.0)  # the gradients of 7 steps of a 2-rank run
    p4, _, state, _ = _run_zero1(2, params, 4, 0.0)[0]
    # 3 ranks continue from the 2-rank state, fed the same mean gradients (rank 0 carries them all)
    shared_state = {k: v.copy() for k, v in state.items()}
    mask = np.arange(N) % 3 != 0
    out = {}
    shared = ThreadCollective(3, timeout=20)

    def rank(r):
        opt = Zero1AdamW(N, shared.for_rank(r), mask)
        opt.load_full_state(shared_state)
        p = p4.copy()
        for step in range(5, 8):
            g = np.mean(np.stack(_rank_grads(step, 2)).astype(np.float64), axis=0).astype(np.float32)
            shard, norm = opt.reduce_gradients(g)  # every rank the same g: the mean is g
            opt.update(p, shard, norm, 1e-2, **HYPER)
        out[r] = p

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert int(shared_state["step"][0]) == 4
    for r in range(3):
        assert np.allclose(out[r], want_p, rtol=1e-5, atol=1e-6)
