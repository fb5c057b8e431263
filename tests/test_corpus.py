"""The shipped KJV corpus: its text, its split, and the token cache built on first use."""

import lzma
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

from koifish_core.data import corpus
from koifish_core.data.loader import TokenLoader, resolve_paths
from koifish_core.data.shards import open_tokens, read_header
from koifish_core.data.tokenizer import EOT, gpt2_encoding
from koifish_core.errors import DataError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KOIFISH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_shipped_text_is_the_whole_kjv_as_plain_verses():
    docs = corpus.read_documents("kjv")
    assert len(docs) == 1189  # chapters of the Protestant canon
    headings = [d.split("\n", 1)[0] for d in docs]
    assert headings[0] == "Genesis 1" and headings[-1] == "Revelation 22" and "1 Samuel 5" in headings
    verses = [line for d in docs for line in d.split("\n")[1:]]
    assert len(verses) == 31102
    assert verses[0] == "In the beginning God created the heaven and the earth."
    assert not any(re.match(r"\d+ ", v) for v in verses)  # verse numbers stripped
    raw = corpus.BUILTIN["kjv"].read_bytes()
    assert raw[:6] == b"\xfd7zXZ\x00" and len(raw) < 1_200_000


def test_builtin_shards_are_built_once_into_the_cache(cache):
    train, val = corpus.builtin_shards("kjv")
    assert train[0].parent == val[0].parent == corpus.cache_folder("kjv")
    assert train[0].parent.parent == cache and train[0].parent.name.startswith("kjv-")
    h_train, h_val = read_header(train[0]), read_header(val[0])
    assert (h_train.version, h_train.dtype, h_val.version, h_val.dtype) == (1, np.uint16, 1, np.uint16)
    assert h_train.num_tokens > 900_000 and 0.03 < h_val.num_tokens / (h_train.num_tokens + h_val.num_tokens) < 0.08
    mtime = train[0].stat().st_mtime_ns
    assert corpus.builtin_shards("kjv") == (train, val) and train[0].stat().st_mtime_ns == mtime
    assert resolve_paths("builtin:kjv") == resolve_paths("builtin:kjv:train") == train
    assert resolve_paths("builtin:kjv:val") == val
    assert sorted(p.name for p in cache.iterdir()) == [train[0].parent.name]  # no temp folder left


def test_split_holds_out_every_20th_chapter(cache):
    train, val = corpus.builtin_shards("kjv")
    enc = gpt2_encoding()
    val_tokens = open_tokens(val[0]).tolist()
    assert val_tokens.count(EOT) == 59 and val_tokens[0] == EOT
    val_docs = enc.decode(val_tokens).split("<|endoftext|>")[1:]
    assert [d.split("\n", 1)[0] for d in val_docs[:3]] == ["Genesis 20", "Genesis 40", "Exodus 10"]
    train_tokens = open_tokens(train[0])
    assert int((train_tokens == EOT).sum()) == 1130
    head = enc.decode(train_tokens[:40].tolist())
    assert head.startswith("<|endoftext|>Genesis 1\nIn the beginning God created the heaven and the earth.\n")
    x, y = TokenLoader(val, 4, 64).next_batch()  # the val split is big enough for a batch
    assert np.array_equal(x.ravel()[1:], y.ravel()[:-1])


def test_small_corpus_tokens_match_an_independent_encode(cache, tmp_path, monkeypatch):
    chapters = [f"Book {i}\nVerse one of chapter {i}.\nVerse two, {'with more ' * (i % 3)}words." for i in range(1, 46)]
    fake = tmp_path / "tiny.txt.xz"
    fake.write_bytes(lzma.compress(("\n\n".join(chapters) + "\n").encode("utf-8")))
    monkeypatch.setitem(corpus.BUILTIN, "tiny", fake)
    train, val = corpus.builtin_shards("tiny")
    enc = gpt2_encoding()

    def encoded(docs):
        return sum(([EOT] + enc.encode_ordinary(d) for d in docs), [])

    assert open_tokens(val[0]).tolist() == encoded([chapters[19], chapters[39]])
    assert open_tokens(train[0]).tolist() == encoded([c for i, c in enumerate(chapters, 1) if i not in (20, 40)])
    # a changed corpus file is a new cache folder, never stale tokens
    fake.write_bytes(lzma.compress("Book 1\nOther text.\n".encode("utf-8")))
    train2, _ = corpus.builtin_shards("tiny")
    assert train2[0].parent != train[0].parent and read_header(train2[0]).num_tokens < 10


def test_concurrent_first_use_builds_one_good_cache(cache):
    # two processes and two threads at once: each must return complete, identical shards
    code = ("from koifish_core.data.corpus import builtin_shards; from koifish_core.data.shards import read_header;"
            "t, v = builtin_shards(); print(read_header(t[0]).num_tokens, read_header(v[0]).num_tokens)")
    env = {**os.environ, "KOIFISH_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = []
    threads = [threading.Thread(target=lambda: results.append(corpus.builtin_shards())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outputs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    train, val = results[0]
    expected = [str(read_header(train[0]).num_tokens), str(read_header(val[0]).num_tokens)]
    assert outputs == [expected, expected] and results[1] == results[0]
    assert sorted(p.name for p in cache.iterdir()) == [train[0].parent.name]


def test_errors(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("KOIFISH_CACHE", str(blocker / "cache"))
    with pytest.raises(DataError, match="KOIFISH_CACHE") as e:
        corpus.builtin_shards("kjv")
    assert str(blocker / "cache") in str(e.value)
    with pytest.raises(DataError, match="builtin:nope: unknown corpus; available: kjv"):
        corpus.builtin_shards("nope")
