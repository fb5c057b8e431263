"""llm.c shard headers (v1, v7, Koifish's Qwen3 magic), memory mapping, atomic writes, bad files."""

import numpy as np
import pytest

from koifish_core.data.shards import HEADER_BYTES, open_tokens, read_header, write_shard
from koifish_core.errors import DataError


def _raw_shard(path, magic, version, tokens, dtype, extra=None):
    """A shard written byte by byte from the llm.c layout, independently of write_shard."""
    header = np.zeros(256, dtype="<i4")
    header[0], header[1], header[2] = magic, version, len(tokens)
    if extra is not None:
        header[3] = extra
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype=dtype).tobytes())
    return path


def test_write_shard_v1_layout_is_llmc(tmp_path):
    tokens = np.random.default_rng(1).integers(0, 50257, 1000)
    p = write_shard(tmp_path / "a.bin", tokens)
    raw = p.read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 1000] and not header[3:].any()
    assert len(raw) == 1024 + 2 * 1000
    assert np.array_equal(np.frombuffer(raw[1024:], dtype="<u2"), tokens)
    h = read_header(p)
    assert (h.magic, h.version, h.num_tokens, h.dtype) == (20240520, 1, 1000, np.uint16)


def test_write_shard_picks_uint32_when_needed_and_obeys_dtype(tmp_path):
    big = write_shard(tmp_path / "b.bin", [0, 65535, 65536, 151643])
    h = read_header(big)
    assert (h.magic, h.version, h.num_tokens, h.dtype) == (20240801, 7, 4, np.uint32)
    assert open_tokens(big).tolist() == [0, 65535, 65536, 151643]
    forced = read_header(write_shard(tmp_path / "c.bin", [1, 2, 3], dtype=np.uint32))
    assert (forced.magic, forced.version, forced.dtype) == (20240801, 7, np.uint32)
    with pytest.raises(DataError, match="do not fit uint16") as e:
        write_shard(tmp_path / "d.bin", [70000], dtype=np.uint16)
    assert "d.bin" in str(e.value)
    with pytest.raises(DataError, match="d.bin"):
        write_shard(tmp_path / "d.bin", [-1])


@pytest.mark.parametrize("magic, version, dtype, extra", [
    (20240520, 1, "<u2", None), (20240801, 7, "<u4", None), (20251218, 1, "<u2", 2), (20251218, 3, "<u4", 4),
])
def test_read_independently_written_headers(tmp_path, magic, version, dtype, extra):
    tokens = [5, 151645 if dtype == "<u4" else 50256, 7, 0]
    p = _raw_shard(tmp_path / "q.bin", magic, version, tokens, dtype, extra)
    h = read_header(p)
    assert (h.magic, h.version, h.num_tokens, h.dtype.itemsize) == (magic, version, 4, int(dtype[-1]))
    toks = open_tokens(p)
    assert isinstance(toks, np.memmap) and toks.tolist() == tokens


def test_open_tokens_maps_without_reading_whole(tmp_path):
    p = write_shard(tmp_path / "m.bin", np.arange(50000) % 50257)
    toks = open_tokens(p)
    assert isinstance(toks, np.memmap) and toks.offset == HEADER_BYTES and not toks.flags.writeable
    assert toks[12345] == 12345 and toks.shape == (50000,)


def test_empty_shard_round_trips(tmp_path):
    p = write_shard(tmp_path / "e.bin", np.zeros(0, dtype=np.int64))
    assert read_header(p).num_tokens == 0 and open_tokens(p).size == 0


def test_write_is_atomic_and_leaves_no_temp_file(tmp_path):
    p = write_shard(tmp_path / "sub" / "x.bin", [1, 2, 3])
    write_shard(p, [4, 5])  # replacing an existing shard
    assert open_tokens(p).tolist() == [4, 5]
    assert sorted(f.name for f in p.parent.iterdir()) == ["x.bin"]


def _damaged(tmp_path, damage):
    p = write_shard(tmp_path / "bad.bin", np.arange(50))
    raw = bytearray(p.read_bytes())
    if damage == "magic":
        raw[0:4] = np.int32(12345).tobytes()
    elif damage == "version":
        raw[4:8] = np.int32(7).tobytes()  # version 7 with the uint16 magic
    elif damage == "koifish width":
        raw[0:4], raw[12:16] = np.int32(20251218).tobytes(), np.int32(3).tobytes()
    elif damage == "truncated":
        raw = raw[:HEADER_BYTES + 20]
    elif damage == "tiny":
        raw = raw[:100]
    elif damage == "negative":
        raw[8:12] = np.int32(-5).tobytes()
    p.write_bytes(bytes(raw))
    return p


@pytest.mark.parametrize("damage, words", [
    ("magic", "magic number 12345"), ("version", "unknown version 7"), ("koifish width", "bytes per token"),
    ("truncated", "truncated: header says 50 tokens"), ("tiny", "too small for a shard header"),
    ("negative", "negative token count"),
])
def test_bad_shards_raise_data_error_naming_the_file(tmp_path, damage, words):
    p = _damaged(tmp_path, damage)
    for read in (read_header, open_tokens):
        with pytest.raises(DataError, match=words) as e:
            read(p)
        assert str(p) in str(e.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match="no such shard file") as e:
        read_header(tmp_path / "nope.bin")
    assert "nope.bin" in str(e.value)
    with pytest.raises(DataError, match="is a folder"):
        read_header(tmp_path)
