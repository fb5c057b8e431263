"""TokenLoader exactness, resume, ranks; eval_batches, iter_windows and resolve_paths."""

import json

import numpy as np
import pytest

from koifish_core.data.loader import TokenLoader, eval_batches, iter_windows, resolve_paths
from koifish_core.data.shards import write_shard
from koifish_core.errors import DataError

SIZES = (700, 301, 20, 900)  # the 20-token shard is too small for any batch below and is skipped


@pytest.fixture
def shards(tmp_path):
    # Token values tell shard and offset apart (shard i, offset j -> 1000*i + j) but stay in uint16.
    streams = [(1000 * i + np.arange(n)) % 65536 for i, n in enumerate(SIZES)]
    paths = [write_shard(tmp_path / f"d_train_{i:06d}.bin", s) for i, s in enumerate(streams)]
    return paths, streams


def reference_batches(streams, B, T, rank=0, world=1, epochs=2):
    """llm.c's DataLoader, written out directly: every step all ranks read B*T+1 tokens from one
    shard at step_start + rank*B*T; a shard is left when the world's next step no longer fits."""
    n, out = B * T, []
    for _ in range(epochs):
        for s in streams:
            step = 0
            while step + world * n + 1 <= len(s):
                buf = s[step + rank * n:step + rank * n + n + 1]
                out.append((buf[:-1].reshape(B, T), buf[1:].reshape(B, T)))
                step += world * n
    return out


def test_batches_equal_direct_slicing(shards):
    paths, streams = shards
    B, T = 2, 16
    loader = TokenLoader(paths, B, T)
    x, y = loader.next_batch()
    assert x.dtype == np.int32 and x.shape == (B, T) and y.shape == (B, T)
    assert np.array_equal(x.ravel(), streams[0][:B * T]) and np.array_equal(y.ravel(), streams[0][1:B * T + 1])
    loader.reset()
    expected = reference_batches(streams, B, T, epochs=2)
    assert len(expected) == 2 * (21 + 9 + 28)  # by hand: p + 33 <= size gives 21, 9, 0 and 28 batches
    for i, (ex, ey) in enumerate(expected):
        x, y = loader.next_batch()
        assert np.array_equal(x, ex) and np.array_equal(y, ey), f"batch {i}"
    assert loader.epoch == 2 and loader.shard_index == 0 and loader.position == 0


def test_shard_switch_and_epoch_counter(shards):
    paths, _ = shards
    loader = TokenLoader(paths, 2, 16)
    for _ in range(21):
        loader.next_batch()
    assert (loader.shard_index, loader.position, loader.epoch) == (1, 0, 0)
    for _ in range(9):
        loader.next_batch()
    assert (loader.shard_index, loader.position) == (3, 0)  # shard 2 is too small, skipped
    for _ in range(28):
        loader.next_batch()
    assert (loader.shard_index, loader.position, loader.epoch) == (0, 0, 1)


@pytest.mark.parametrize("split", [1, 20, 21, 29, 30, 57, 58, 75])  # mid-shard, shard edges, epoch wrap
def test_resume_returns_exactly_the_unbroken_batches(shards, split):
    paths, _ = shards
    unbroken = TokenLoader(paths, 2, 16)
    batches = [unbroken.next_batch() for _ in range(90)]
    first = TokenLoader(paths, 2, 16)
    for _ in range(split):
        first.next_batch()
    state = json.loads(json.dumps(first.state()))  # what a checkpoint stores
    assert {"shard_index", "position", "epoch"} <= state.keys()
    resumed = TokenLoader(paths, 2, 16)
    resumed.load_state(state)
    for i in range(split, 90):
        x, y = resumed.next_batch()
        assert np.array_equal(x, batches[i][0]) and np.array_equal(y, batches[i][1]), f"batch {i}"
    assert resumed.state() == unbroken.state()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_disjoint_windows_in_lockstep(shards, world):
    paths, streams = shards
    B, T = 2, 8
    loaders = [TokenLoader(paths, B, T, rank=r, world_size=world) for r in range(world)]
    expected = [reference_batches(streams, B, T, r, world, epochs=1) for r in range(world)]
    assert len({len(e) for e in expected}) == 1
    seen = set()
    for step in range(len(expected[0])):
        for r, loader in enumerate(loaders):
            x, y = loader.next_batch()
            assert np.array_equal(x, expected[r][step][0]) and np.array_equal(y, expected[r][step][1])
            tokens = set(x.ravel().tolist())
            assert not tokens & seen, f"rank {r} repeats tokens at step {step}"
            seen |= tokens
        assert len({(ld.shard_index, ld.epoch) for ld in loaders}) == 1  # all ranks change shard together
    # rank r of the first step starts at r*B*T
    fresh = [TokenLoader(paths, B, T, rank=r, world_size=world).next_batch()[0] for r in range(world)]
    assert [int(x[0, 0]) for x in fresh] == [r * B * T for r in range(world)]


def test_load_state_refuses_a_different_setup(shards, tmp_path):
    paths, _ = shards
    loader = TokenLoader(paths, 2, 16)
    for _ in range(25):
        loader.next_batch()
    state = loader.state()
    with pytest.raises(DataError, match="B=2, T=16"):
        TokenLoader(paths, 4, 16).load_state(state)
    with pytest.raises(DataError, match="rank 1 of 2"):
        TokenLoader(paths, 2, 16, rank=1, world_size=2).load_state(state)
    with pytest.raises(DataError, match="data set changed"):
        TokenLoader([paths[0], paths[3]], 2, 16).load_state(state)
    with pytest.raises(DataError, match="not a step boundary"):
        TokenLoader(paths, 2, 16).load_state({**state, "position": state["position"] + 5})
    with pytest.raises(DataError, match="expected integer shard_index"):
        TokenLoader(paths, 2, 16).load_state({"position": 3})


def test_loader_errors_name_what_is_wrong(shards, tmp_path):
    paths, _ = shards
    with pytest.raises(DataError, match="no shard holds the 1,001 tokens") as e:
        TokenLoader(paths, 10, 100)
    assert paths[3].name in str(e.value)  # the largest shard
    with pytest.raises(DataError, match="positive"):
        TokenLoader(paths, 0, 16)
    with pytest.raises(DataError, match="rank 2 is outside world size 2"):
        TokenLoader(paths, 2, 16, rank=2, world_size=2)
    bad = tmp_path / "d_train_000009.bin"
    bad.write_bytes(b"\0" * 2000)
    with pytest.raises(DataError, match="magic number 0") as e:
        TokenLoader(str(tmp_path / "d_train_*.bin"), 2, 16)
    assert str(bad) in str(e.value)


def test_eval_batches_are_deterministic_and_one_pass(shards):
    paths, streams = shards
    a = [x.tobytes() for x, _ in eval_batches(paths, 2, 16, max_batches=5)]
    b = [x.tobytes() for x, _ in eval_batches(paths, 2, 16, max_batches=5)]
    assert a == b and len(a) == 5
    everything = list(eval_batches(paths, 2, 16))
    expected = reference_batches(streams, 2, 16, epochs=1)
    assert len(everything) == len(expected) == 58
    assert all(np.array_equal(x, ex) for (x, _), (ex, _) in zip(everything, expected))


def test_iter_windows_cross_shards_and_drop_the_tail(shards):
    paths, streams = shards
    stream = np.concatenate(streams)
    for T in (64, 1, 1920):
        windows = list(iter_windows(paths, T))
        assert len(windows) == (stream.size - 1) // T
        for k in {0, 11 % len(windows), len(windows) - 1}:
            x, y = windows[k]
            assert np.array_equal(x, stream[k * T:(k + 1) * T])
            assert np.array_equal(y, stream[k * T + 1:(k + 1) * T + 1])
    assert list(iter_windows(paths, stream.size)) == []  # one token short of a window


def test_resolve_paths_forms(shards, tmp_path):
    paths, _ = shards
    (tmp_path / "notes.txt").write_text("not a shard")
    assert resolve_paths(str(tmp_path / "d_train_*.bin")) == paths
    assert resolve_paths(str(tmp_path)) == paths  # a folder: its *.bin, sorted by name
    assert resolve_paths(tmp_path) == paths
    assert resolve_paths([str(p) for p in paths[:2]]) == paths[:2]
    assert resolve_paths(str(tmp_path / "*.bin"), max_shards=2) == paths[:2]
    assert TokenLoader(str(tmp_path / "*.bin"), 2, 16, max_shards=1).paths == paths[:1]


def test_resolve_paths_errors(tmp_path):
    with pytest.raises(DataError, match="no token shards match this pattern") as e:
        resolve_paths(str(tmp_path / "nothing_*.bin"))
    assert "nothing_*.bin" in str(e.value) and f"looked in {tmp_path}" in str(e.value)
    with pytest.raises(DataError, match="does not exist") as e:
        resolve_paths(str(tmp_path / "missing" / "*.bin"))
    assert str(tmp_path / "missing") in str(e.value)
    with pytest.raises(DataError, match="holds no \\*.bin"):
        resolve_paths(str(tmp_path))
    with pytest.raises(DataError, match="max_shards"):
        resolve_paths(str(tmp_path), max_shards=0)
    with pytest.raises(DataError, match="builtin:kjv:test: expected builtin:kjv"):
        resolve_paths("builtin:kjv:test")
    with pytest.raises(DataError, match="unknown corpus"):
        resolve_paths("builtin:shakespeare")
