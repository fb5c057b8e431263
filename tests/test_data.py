"""Shards, the resumable loader, the offline GPT-2 tokenizer, text preparation, the shipped corpus."""

import numpy as np
import pytest

from koifish_core.data.loader import TokenLoader, eval_batches, iter_windows, resolve_paths
from koifish_core.data.shards import HEADER_BYTES, MAGIC_KOIFISH, open_tokens, read_header, write_shard
from koifish_core.errors import DataError


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    streams = [rng.integers(0, 50257, n) for n in (700, 301, 900)]
    paths = [write_shard(tmp_path / f"d_train_{i:06d}.bin", s) for i, s in enumerate(streams)]
    return paths, streams


def test_header_round_trip_both_versions(tmp_path):
    small = write_shard(tmp_path / "a.bin", np.arange(100))
    big = write_shard(tmp_path / "b.bin", np.array([0, 70000, 151643]))
    h1, h7 = read_header(small), read_header(big)
    assert (h1.magic, h1.version, h1.num_tokens, h1.dtype) == (20240520, 1, 100, np.uint16)
    assert (h7.magic, h7.version, h7.num_tokens, h7.dtype) == (20240801, 7, 3, np.uint32)
    toks = open_tokens(big)
    assert isinstance(toks, np.memmap) and toks.tolist() == [0, 70000, 151643]


def test_koifish_qwen3_header(tmp_path):
    header = np.zeros(256, dtype="<i4")
    header[:4] = [MAGIC_KOIFISH, 1, 3, 4]
    p = tmp_path / "q.bin"
    p.write_bytes(header.tobytes() + np.array([5, 151645, 7], dtype="<u4").tobytes())
    assert open_tokens(p).tolist() == [5, 151645, 7]


@pytest.mark.parametrize("damage, words", [
    ("magic", "magic number"), ("version", "version"), ("truncate", "truncated"), ("tiny", "too small"),
])
def test_bad_shards_name_the_file(tmp_path, damage, words):
    p = write_shard(tmp_path / "bad.bin", np.arange(50))
    raw = bytearray(p.read_bytes())
    if damage == "magic":
        raw[0:4] = np.int32(12345).tobytes()
    elif damage == "version":
        raw[4:8] = np.int32(7).tobytes()
    elif damage == "truncate":
        raw = raw[:HEADER_BYTES + 20]
    else:
        raw = raw[:100]
    p.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=words) as e:
        TokenLoader(str(p), 1, 4)
    assert str(p) in str(e.value)


def test_empty_glob_names_the_pattern(tmp_path):
    with pytest.raises(DataError, match="no token shards match"):
        resolve_paths(str(tmp_path / "nothing_*.bin"))


def test_batches_are_consecutive_windows(shards):
    paths, streams = shards
    B, T = 2, 16
    loader = TokenLoader(paths, B, T)
    x, y = loader.next_batch()
    s = streams[0]
    assert np.array_equal(x.ravel(), s[:B * T]) and np.array_equal(y.ravel(), s[1:B * T + 1])
    # walk until the loader moves to shard 1 and check the first window there
    while loader.shard_index == 0:
        loader.next_batch()
    x, _ = loader.next_batch()
    assert np.array_equal(x.ravel(), streams[1][:B * T])


def test_resume_returns_exactly_the_same_batches(shards):
    paths, _ = shards
    unbroken = TokenLoader(paths, 2, 16)
    first = [unbroken.next_batch() for _ in range(60)]  # crosses shards and wraps an epoch
    assert unbroken.epoch >= 1
    a = TokenLoader(paths, 2, 16)
    for _ in range(23):
        a.next_batch()
    b = TokenLoader(paths, 2, 16)
    b.load_state(a.state())
    for i in range(23, 60):
        x, y = b.next_batch()
        assert np.array_equal(x, first[i][0]) and np.array_equal(y, first[i][1])


def test_ranks_read_disjoint_windows(shards):
    paths, _ = shards
    seen = []
    for rank in range(2):
        loader = TokenLoader(paths[:1], 2, 16, rank=rank, world_size=2)
        seen.append(loader.next_batch()[0].tobytes())
    assert seen[0] != seen[1]


def test_iter_windows_cross_shards_and_drop_the_tail(shards):
    paths, streams = shards
    stream = np.concatenate(streams)
    T = 64
    windows = list(iter_windows(paths, T))
    assert len(windows) == (stream.size - 1) // T
    for k in (0, 11, len(windows) - 1):
        x, y = windows[k]
        assert np.array_equal(x, stream[k * T:(k + 1) * T]) and np.array_equal(y, stream[k * T + 1:(k + 1) * T + 1])


def test_eval_batches_are_the_same_each_time(shards):
    paths, _ = shards
    a = [x.tobytes() for x, _ in eval_batches(paths, 2, 16, max_batches=5)]
    b = [x.tobytes() for x, _ in eval_batches(paths, 2, 16, max_batches=5)]
    assert a == b and len(a) == 5


def test_tokenizer_matches_hugging_face_tokenizers():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from koifish_core.data.tokenizer import gpt2_encoding, gpt2_files

    vocab_bpe, encoder_json = gpt2_files()
    hf = Tokenizer(models.BPE.from_file(str(encoder_json), str(vocab_bpe)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    enc = gpt2_encoding()
    texts = ["Hello world", "  leading  and   trailing   ", "Ünïcödé naïve café 東京 🐟🐠",
             "def f(x):\n\treturn x**2  # 12345 67.89\n\n\n", "I'm can't we'll they've", "a" * 300]
    for t in texts:
        assert enc.encode_ordinary(t) == hf.encode(t).ids, t
        assert enc.decode(enc.encode_ordinary(t)) == t
    assert enc.n_vocab == 50257 and enc.eot_token == 50256


def test_prepare_texts_round_trip(tmp_path):
    from koifish_core.data.prepare import _pieces, prepare_texts
    from koifish_core.data.tokenizer import EOT, gpt2_encoding

    docs = ["First document.\nIt has two lines.\n", "Second one, with    spaces\n\n\nand blank lines.\n"]
    files = []
    for i, d in enumerate(docs):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(d)
    res = prepare_texts(files, tmp_path / "out", val_fraction=0.25, shard_tokens=10)
    stream = np.concatenate([open_tokens(p) for p in res.train_paths + res.val_paths])
    assert len(res.train_paths) > 1 and res.num_val_tokens > 0
    assert stream[0] == EOT and (stream == EOT).sum() == 2
    assert gpt2_encoding().decode(stream.tolist()) == "<|endoftext|>" + docs[0] + "<|endoftext|>" + docs[1]
    text = "word\n" * 50 + "\n\n  indented\nmore\n" * 40
    enc = gpt2_encoding()
    assert sum((enc.encode_ordinary(p) for p in _pieces(text, size=37)), []) == enc.encode_ordinary(text)


def test_prepare_missing_file(tmp_path):
    from koifish_core.data.prepare import prepare_texts

    with pytest.raises(DataError, match="no such text file"):
        prepare_texts([tmp_path / "missing.txt"], tmp_path / "out")


def test_builtin_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("KOIFISH_CACHE", str(tmp_path))
    train, val = resolve_paths("builtin:kjv:train"), resolve_paths("builtin:kjv:val")
    n_train, n_val = read_header(train[0]).num_tokens, read_header(val[0]).num_tokens
    assert n_train > 900_000 and 0.03 < n_val / (n_train + n_val) < 0.08
    assert resolve_paths("builtin:kjv:train") == train  # cached: the second call reuses the shards
