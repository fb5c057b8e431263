"""prepare_texts: text files to shards that decode back to the text, with EOT before each document."""

import numpy as np
import pytest
from rich.console import Console
from rich.progress import Progress

from koifish_core.data import prepare
from koifish_core.data.prepare import prepare_texts
from koifish_core.data.shards import open_tokens, read_header
from koifish_core.data.tokenizer import EOT, gpt2_encoding
from koifish_core.errors import DataError

DOCS = [
    "First document.\nIt has two lines.\n",
    "Second one, with    spaces\n\n\nand blank lines.   \n\n  Indented, trailing \n",
    "Third: ünïcode 東京 🐟, numbers 12345, and a Windows line\r\nending.",
]


def _write(tmp_path, docs):
    files = []
    for i, d in enumerate(docs):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_bytes(d.encode("utf-8"))
    return files


def _stream(result):
    return np.concatenate([open_tokens(p) for p in result.train_paths + result.val_paths]).astype(np.int64)


def test_shards_decode_back_to_the_text_with_eot_first(tmp_path):
    res = prepare_texts(_write(tmp_path, DOCS), tmp_path / "out", val_fraction=0.25, shard_tokens=10)
    stream = _stream(res)
    enc = gpt2_encoding()
    expected = sum(([EOT] + enc.encode_ordinary(d) for d in DOCS), [])  # each document encoded whole
    assert stream.tolist() == expected
    assert enc.decode(stream.tolist()) == "".join("<|endoftext|>" + d for d in DOCS)
    assert res.num_train_tokens + res.num_val_tokens == len(expected)
    assert res.num_val_tokens == round(0.25 * len(expected))
    assert len(res.train_paths) == -(-res.num_train_tokens // 10) > 1
    assert [p.name for p in res.train_paths[:2]] == ["out_train_000000.bin", "out_train_000001.bin"]
    assert res.val_paths[0].name == "out_val_000000.bin"
    for p in res.train_paths + res.val_paths:
        h = read_header(p)
        assert h.version == 1 and h.dtype == np.uint16 and h.num_tokens <= 10
    assert sorted(f.name for f in (tmp_path / "out").iterdir() if not f.name.endswith(".bin")) == []


def _random_text(rng, n):
    pool = list("ab \n\t.'") + ["  ", "\n\n", "x \n", " \nY", "é", "🐟", "\r\n"]
    return "".join(rng.choice(pool, size=n))


def test_pieces_tokenize_exactly_as_the_whole_text():
    enc = gpt2_encoding()
    rng = np.random.default_rng(0)
    for size in (5, 17, 64):
        for _ in range(60):
            text = _random_text(rng, 300)
            pieces = list(prepare._pieces(text, size))
            assert "".join(pieces) == text
            assert sum((enc.encode_ordinary(p) for p in pieces), []) == enc.encode_ordinary(text), repr(text)
    assert list(prepare._pieces("no newline at all " * 10, 7)) == ["no newline at all " * 10]


def test_long_files_in_many_pieces_match_one_encode(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "PIECE_CHARS", 40)
    rng = np.random.default_rng(1)
    texts = [_random_text(rng, 2000), "word\n" * 300 + "  indented\nmore \n" * 40]
    res = prepare_texts(_write(tmp_path, texts), tmp_path / "out", val_fraction=0.1)
    enc = gpt2_encoding()
    assert _stream(res).tolist() == sum(([EOT] + enc.encode_ordinary(t) for t in texts), [])


def test_split_docs_puts_eot_before_each_block(tmp_path):
    text = "Block one\nline two\n\n\nBlock two\n  \nBlock three\n"
    res = prepare_texts(_write(tmp_path, [text]), tmp_path / "out", val_fraction=0.0, split_docs=True)
    stream = _stream(res).tolist()
    enc = gpt2_encoding()
    blocks = ["Block one\nline two", "Block two", "Block three\n"]
    assert stream == sum(([EOT] + enc.encode_ordinary(b) for b in blocks), [])
    assert res.val_paths == [] and res.num_val_tokens == 0


def test_progress_is_driven_by_bytes(tmp_path):
    files = _write(tmp_path, DOCS)
    total = sum(f.stat().st_size for f in files)
    with Progress(console=Console(file=open(tmp_path / "log", "w"))) as progress:
        prepare_texts(files, tmp_path / "a", progress=progress)
        (task,) = progress.tasks
        assert task.total == total and task.completed == total
    calls = []
    prepare_texts(files, tmp_path / "b", progress=lambda done, of: calls.append((done, of)))
    assert calls[-1] == (total, total) and all(a <= b for (a, _), (b, _) in zip(calls, calls[1:]))


def test_rerun_replaces_old_shards_and_keeps_names(tmp_path):
    files = _write(tmp_path, DOCS)
    first = prepare_texts(files, tmp_path / "out", shard_tokens=10, name="mine")
    assert len(first.train_paths) > 1 and first.train_paths[0].name == "mine_train_000000.bin"
    first_stream = _stream(first).tolist()
    (tmp_path / "out" / "other_train_000005.bin").write_bytes(b"not ours")
    second = prepare_texts(files, tmp_path / "out", shard_tokens=1000, name="mine")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["mine_train_000000.bin", "mine_val_000000.bin", "other_train_000005.bin"]
    assert _stream(second).tolist() == first_stream and second.num_train_tokens == first.num_train_tokens


def test_empty_files_are_skipped_but_all_empty_is_an_error(tmp_path):
    files = _write(tmp_path, ["", "some text\n", "  \n\n"])
    res = prepare_texts(files, tmp_path / "out", val_fraction=0.0)
    assert res.skipped == [files[0], files[2]]
    assert _stream(res).tolist() == [EOT] + gpt2_encoding().encode_ordinary("some text\n")
    with pytest.raises(DataError, match="no text to tokenize") as e:
        prepare_texts([files[0], files[2]], tmp_path / "out2")
    assert str(files[0]) in str(e.value)


def test_bad_inputs_raise_data_error_naming_the_path(tmp_path):
    (good,) = _write(tmp_path, ["text\n"])
    with pytest.raises(DataError, match="missing.txt: no such text file"):
        prepare_texts([good, tmp_path / "missing.txt"], tmp_path / "out")
    with pytest.raises(DataError, match="is a folder"):
        prepare_texts([tmp_path], tmp_path / "out")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt: not UTF-8"):
        prepare_texts([latin1], tmp_path / "out")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(DataError, match="cannot create the output folder") as e:
        prepare_texts([good], blocker / "out")
    assert str(blocker / "out") in str(e.value)
    with pytest.raises(DataError, match="no input files"):
        prepare_texts([], tmp_path / "out")
    with pytest.raises(DataError, match="val fraction"):
        prepare_texts([good], tmp_path / "out", val_fraction=1.0)
    with pytest.raises(DataError, match="shard tokens"):
        prepare_texts([good], tmp_path / "out", shard_tokens=0)
