"""How the global batch, the gradient buckets and the ZeRO-1 shards are divided."""

import numpy as np
import pytest

from koifish_core.data.loader import TokenLoader
from koifish_core.dist.collective import ThreadCollective
from koifish_core.dist.data_parallel import (DEFAULT_BUCKET_BYTES, ShardPlan, TensorSpan, all_reduce_buckets,
                                             bucket_plan, flat_layout, rank_batches, rank_rows)
from koifish_core.errors import KoifishError
from koifish_core.models.gpt2 import GPT2, GPT2Config


@pytest.mark.parametrize("B, world", [(8, 1), (8, 2), (8, 4), (12, 3), (4, 4)])
def test_rank_rows_tile_the_batch_in_rank_order(B, world):
    rows = [rank_rows(B, r, world) for r in range(world)]
    covered = np.concatenate([np.arange(B)[s] for s in rows])
    assert np.array_equal(covered, np.arange(B))
    assert {s.stop - s.start for s in rows} == {B // world}


def test_uneven_batches_and_bad_ranks_are_refused():
    with pytest.raises(KoifishError, match="data.batch_size 6 does not split evenly over 4 ranks"):
        rank_rows(6, 0, 4)
    with pytest.raises(KoifishError, match="rank 2 is outside a world of 2"):
        rank_rows(4, 2, 2)


def test_every_rank_reads_the_same_window_and_keeps_its_rows(tiny_data):
    glob = str(tiny_data / "tiny_train_*.bin")
    one = TokenLoader(glob, 4, 16)
    loaders = [TokenLoader(glob, 4, 16) for _ in range(2)]  # one per rank, the same global batch size
    for _ in range(30):  # past a shard boundary and an epoch
        x, y = one.next_batch()
        parts = [rank_batches([ld.next_batch()], r, 2)[0] for r, ld in enumerate(loaders)]
        assert np.array_equal(np.concatenate([p[0] for p in parts]), x)
        assert np.array_equal(np.concatenate([p[1] for p in parts]), y)
    # the data position, and so a checkpoint's loader state, is the single process's
    assert all(ld.state() == one.state() for ld in loaders)


def _tiny_model(dtype=np.float64):
    m = GPT2(GPT2Config(vocab_size=61, n_ctx=8, n_layer=2, n_head=2, n_embd=8, ffn=32), dtype=dtype)
    m.init_weights(3)
    return m


@pytest.mark.parametrize("world", [2, 4])
def test_mean_of_rank_gradients_is_the_global_batch_gradient(world):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 61, (8, 8)).astype(np.int32)
    y = rng.integers(0, 61, (8, 8)).astype(np.int32)
    model = _tiny_model()
    model.zero_grad()
    _, full_loss = model.forward(x, y)
    model.backward()
    want = model.grads.copy()
    grads, losses = [], []
    for (xr, yr) in [rank_batches([(x, y)], r, world)[0] for r in range(world)]:
        model.zero_grad()
        _, loss = model.forward(xr, yr)
        model.backward()
        grads.append(model.grads.copy())
        losses.append(loss)
    assert np.allclose(np.mean(grads, axis=0), want, rtol=1e-10, atol=1e-14)
    assert np.isclose(np.mean(losses), full_loss, rtol=1e-12)


def test_flat_layout_finds_each_tensor():
    model = _tiny_model(np.float32)
    spans = flat_layout(model.param_views(), model.params)
    assert [s.name for s in spans] == list(model.param_views())
    assert spans[0].start == 0 and spans[-1].stop == model.params.size
    assert all(a.stop == b.start for a, b in zip(spans, spans[1:]))
    for s in spans:
        assert np.shares_memory(model.params[s.start:s.stop], model.param_views()[s.name])
    with pytest.raises(KoifishError, match="not a contiguous piece"):
        flat_layout({"t": model.params[::2]}, model.params)


def _spans(sizes, names=None):
    out, pos = [], 0
    for i, n in enumerate(sizes):
        out.append(TensorSpan(names[i] if names else f"t{i}", pos, pos + n))
        pos += n
    return out


@pytest.mark.parametrize("sizes, cap_elems", [
    ([10, 20, 30, 40, 50], 60),
    ([5] * 17, 12),
    ([100, 3, 3, 100], 50),   # tensors larger than the cap get a bucket of their own
    ([7], 1000),
])
def test_buckets_cover_the_flat_gradient_last_layer_first(sizes, cap_elems):
    spans = _spans(sizes)
    buckets = bucket_plan(spans, itemsize=4, bucket_bytes=cap_elems * 4)
    # contiguous, in reverse order, no gaps or overlaps, covering everything
    assert buckets[0].stop == sum(sizes) and buckets[-1].start == 0
    assert all(a.start == b.stop for a, b in zip(buckets, buckets[1:]))
    names = [n for b in buckets for n in b.names]
    assert names == [s.name for s in reversed(spans)]
    by_name = {s.name: s for s in spans}
    for b in buckets:
        assert b.size == sum(by_name[n].size for n in b.names)
        assert b.size <= cap_elems or len(b.names) == 1
    # greedy: a bucket could not have taken the next tensor without passing the cap
    for a, b in zip(buckets, buckets[1:]):
        assert a.size + by_name[b.names[0]].size > cap_elems


def test_gpt2_124m_buckets_are_about_25_mb():
    shapes = GPT2Config(vocab_size=50257, n_ctx=1024, n_layer=12, n_head=12, n_embd=768, ffn=3072).param_shapes()
    spans = _spans([int(np.prod(s)) for s in shapes.values()], list(shapes))
    buckets = bucket_plan(spans, itemsize=4)
    assert buckets[0].names[0] == "ln_f.bias" and buckets[-1].names[-1] == "wte"
    big = [b for b in buckets if len(b.names) > 1]
    assert all(b.size * 4 <= DEFAULT_BUCKET_BYTES for b in big)
    assert buckets[-1].names == ("wte",)  # ~147 MB: larger than the cap, so alone
    assert 15 <= len(buckets) <= 20  # ~330 MB of fp32 gradients besides wte, in <= 25 MB pieces
    assert all(b.size * 4 > DEFAULT_BUCKET_BYTES / 2 for b in big)


def test_buckets_need_one_contiguous_array():
    with pytest.raises(KoifishError, match="not adjacent"):
        bucket_plan([TensorSpan("a", 0, 4), TensorSpan("b", 8, 12)])
    with pytest.raises(KoifishError, match="positive"):
        bucket_plan(_spans([4]), bucket_bytes=0)


def test_bucketed_all_reduce_equals_one_all_reduce():
    import threading

    world, spans = 3, _spans([11, 7, 30, 2, 9])
    buckets = bucket_plan(spans, bucket_bytes=20 * 4)
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(59).astype(np.float32) for _ in range(world)]
    want = np.mean(np.stack(grads).astype(np.float64), axis=0)
    shared = ThreadCollective(world, timeout=20)
    threads = [threading.Thread(target=all_reduce_buckets, args=(shared.for_rank(r), grads[r], buckets))
               for r in range(world)]
    [t.start() for t in threads]
    [t.join(20) for t in threads]
    for g in grads:
        assert np.allclose(g, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n, world", [(10, 1), (10, 2), (10, 3), (10, 4), (3, 4), (124_439_808, 8)])
def test_shard_plan(n, world):
    plan = ShardPlan(n, world)
    assert plan.padded % world == 0 and n <= plan.padded < n + world
    bounds = [plan.bounds(r) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == plan.padded
    assert all(b - a == plan.shard_size for a, b in bounds)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    owned = [plan.owned(r) for r in range(world)]
    assert sum(b - a for a, b in owned) == n


def test_shard_plan_pads_with_zeros():
    plan = ShardPlan(5, 4)
    out = plan.pad(np.arange(1, 6, dtype=np.float32))
    assert out.tolist() == [1, 2, 3, 4, 5, 0, 0, 0] and plan.owned(3) == (5, 5)
    with pytest.raises(KoifishError, match="expected 5 elements, got 4"):
        plan.pad(np.zeros(4))
