"""Data-parallel training on the CPU with ranks as threads (ThreadCollective): the engine keeps
every rank's parameters identical and equal to the single-process step; checkpoints written by
N ranks resume on any other N and continue the same curve."""

import shutil
import threading

import numpy as np
import pytest

from koifish_core.config import load_case
from koifish_core.dist.collective import ThreadCollective
from koifish_core.dist.data_parallel import rank_batches
from koifish_core.engine.cpu import CPUEngine
from koifish_core.train.metrics import read_metrics
from koifish_core.train.trainer import STOP_FILE, DistContext, train


def _threads(world, body, timeout=120):
    """body(rank, handle) per rank as threads; a failing rank aborts the others instead of hanging them."""
    shared = ThreadCollective(world, timeout=timeout)
    results, errors = {}, {}

    def run(r):
        try:
            results[r] = body(r, shared.for_rank(r))
        except Exception as e:  # noqa: BLE001  (re-raised below)
            errors[r] = e
            shared.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join(timeout) for t in threads]
    if errors:
        raise errors[min(errors)]
    return [results[r] for r in range(world)]


def _engine(case, world, collective=None):
    import copy

    c = copy.deepcopy(case)
    c.data.batch_size //= world
    e = CPUEngine(c)
    e.collective = collective
    return e


@pytest.mark.parametrize("world, accum", [(2, 1), (4, 1), (2, 3)])
def test_every_rank_holds_the_single_process_parameters(tiny_case, world, accum):
    # AdamW's eps at 1e-6, not 1e-8: a token absent from a batch gets a gradient near 1e-8 (only the tied
    # head's softmax reaches it), where g/(|g|+eps) turns the float32 rounding of a different summation
    # order (0.5% of so small a sum) into a 0.1% change of a whole lr-sized update (3e-6 here).
    case = load_case(tiny_case(data={"batch_size": 4},
                               optimizer={"grad_accum": accum, "grad_clip": 0.5, "eps": 1e-6})).case
    rng = np.random.default_rng(5)
    steps = [[(x := rng.integers(0, 97, (4, 16)).astype(np.int32), np.roll(x, -1, axis=1)) for _ in range(accum)]
             for _ in range(4)]
    one = _engine(case, 1)
    want = [one.train_step(b, 3e-3) for b in steps]

    def rank(r, handle):
        e = _engine(case, world, handle)
        got = [e.train_step(rank_batches(b, r, world), 3e-3) for b in steps]
        return e.model.params.copy(), got

    ranks = _threads(world, rank)
    for params, got in ranks:
        assert np.array_equal(params, ranks[0][0])  # identical bits on every rank
        assert np.allclose(params, one.model.params, rtol=1e-5, atol=1e-6)
        assert np.allclose([g.loss for g in got], [w.loss for w in want], rtol=1e-6)
        assert np.allclose([g.grad_norm for g in got], [w.grad_norm for w in want], rtol=1e-5)


def _train_ranks(path, run_dir, world, **kw):
    return _threads(world, lambda r, h: train(load_case(path), run_dir, dist=DistContext(r, world, h), **kw))


def _curve(run):
    return {r["step"]: r["loss"] for r in read_metrics(run, kinds=("train",))}


def test_a_checkpoint_from_2_ranks_resumes_on_1_and_on_4(tmp_path, tiny_case):
    path = tiny_case(data={"batch_size": 4}, train={"steps": 16, "log_every": 1}, checkpoint={"every": 8},
                     eval={"every": 0})
    train(load_case(path), tmp_path / "one")
    want = _curve(tmp_path / "one")

    def stop_at_8(rec):
        if rec["kind"] == "train" and rec["step"] == 8:
            (tmp_path / "two" / STOP_FILE).write_text("")

    _train_ranks(path, tmp_path / "two", 2, on_log=stop_at_8)
    assert max(_curve(tmp_path / "two")) == 8
    shutil.copytree(tmp_path / "two", tmp_path / "two_then_four")
    train(load_case(path), tmp_path / "two", resume=True)  # N=1 from N=2's checkpoint
    _train_ranks(path, tmp_path / "two_then_four", 4, resume=True)  # N=4 from the same checkpoint
    for run in ("two", "two_then_four"):
        got = _curve(tmp_path / run)
        assert sorted(got) == sorted(want) == list(range(1, 17))
        assert np.allclose([got[s] for s in want], list(want.values()), rtol=1e-5, atol=1e-6), run
    # the final checkpoints hold the same weights whatever N trained the second half
    from koifish_core.train import checkpoint

    tensors = [checkpoint.load(checkpoint.latest(tmp_path / run))[0] for run in ("one", "two", "two_then_four")]
    for other in tensors[1:]:
        assert all(np.allclose(other[k], tensors[0][k], rtol=1e-4, atol=1e-6) for k in tensors[0])


def test_zero1_follows_the_single_process_curve_and_its_checkpoint_resumes_anywhere(tmp_path, tiny_case, monkeypatch):
    """ZeRO-1 on 2 ranks (each keeps half of AdamW's moments, with clipping and instability checks
    on): the single-process curve; its checkpoint holds the whole moments, so 1 rank (unsharded)
    and 4 ranks (sharded 4 ways) continue the same curve."""
    path = tiny_case(data={"batch_size": 4}, train={"steps": 16, "log_every": 1}, checkpoint={"every": 8},
                     eval={"every": 0}, optimizer={"grad_clip": 0.5}, dist={"zero1": True})
    train(load_case(path), tmp_path / "one")
    want = _curve(tmp_path / "one")

    def stop_at_8(rec):
        if rec["kind"] == "train" and rec["step"] == 8:
            (tmp_path / "two" / STOP_FILE).write_text("")

    from koifish_core.dist.zero1 import Zero1AdamW

    sharded_updates = []
    update = Zero1AdamW.update
    monkeypatch.setattr(Zero1AdamW, "update", lambda self, *a, **k: (sharded_updates.append(self.m.size),
                                                                     update(self, *a, **k)))
    _train_ranks(path, tmp_path / "two", 2, on_log=stop_at_8)
    n = CPUEngine(load_case(path).case).model.params.size
    assert len(sharded_updates) == 2 * 8 and set(sharded_updates) == {-(-n // 2)}  # each rank: half the moments
    from koifish_core.train import checkpoint

    _, optim, _ = checkpoint.load(checkpoint.latest(tmp_path / "two"))
    assert optim["m"].shape == optim["v"].shape == (n,) and int(optim["step"][0]) == 8  # whole, not a shard
    shutil.copytree(tmp_path / "two", tmp_path / "two_then_four")
    train(load_case(path), tmp_path / "two", resume=True)
    _train_ranks(path, tmp_path / "two_then_four", 4, resume=True)
    for run in ("two", "two_then_four"):
        got = _curve(tmp_path / run)
        assert sorted(got) == list(range(1, 17))
        assert np.allclose([got[s] for s in want], list(want.values()), rtol=1e-5, atol=1e-6), run


def test_only_rank_0_writes(tmp_path, tiny_case):
    path = tiny_case(data={"batch_size": 4}, train={"steps": 4})
    seen = {}

    def rank(r, h):
        logs = []
        train(load_case(path), tmp_path / f"rank{r}", dist=DistContext(r, 2, h), on_log=logs.append)
        seen[r] = logs

    _threads(2, rank)
    assert (tmp_path / "rank0" / "metrics.jsonl").exists() and (tmp_path / "rank0" / "checkpoints").exists()
    assert not (tmp_path / "rank1").exists()
    assert seen[1] == [] and any(rec["kind"] == "train" for rec in seen[0])
