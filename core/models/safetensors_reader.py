"""Read Hugging Face weight folders one tensor at a time, so host memory holds one tensor, not a model.

A folder has model.safetensors, or shards model-0000x-of-0000y.safetensors listed by
model.safetensors.index.json ({"weight_map": {tensor name: shard file}}).
safetensors' NumPy reader cannot return bf16 (NumPy has no such type), so bf16 tensors are read
from the file's own header offsets and widened to float32 by a 16-bit shift (exact, torch-free).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from koifish_core.errors import ModelError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder, in index order."""
    folder = Path(folder)
    index = folder / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelError(f"{index}: expected JSON with a \"weight_map\" object ({e})") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelError(f"{index}: lists shards that are not in the folder: {', '.join(missing)} "
                             "(an interrupted download?)")
        return files
    if (folder / SINGLE).exists():
        return [folder / SINGLE]
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    if shards:
        raise ModelError(f"{folder}: has {len(shards)} weight shards but no {INDEX} to list them")
    raise ModelError(f"{folder}: no weights: expected {SINGLE} or {INDEX} with its shards")


def _header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset of the data) per the safetensors layout: u64 length, JSON, data."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        try:
            return json.loads(f.read(n)), 8 + n
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelError(f"{path}: damaged safetensors header") from None


def _bf16_to_f32(path: Path, info: dict, data_start: int) -> np.ndarray:
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    raw = np.memmap(path, dtype=np.uint16, mode="r", offset=data_start + begin, shape=((end - begin) // 2,))
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)


def iter_tensors(folder: Path) -> Iterator[tuple[str, np.ndarray, Path]]:
    """(name, array, file) for every tensor of the folder; bf16 comes back as float32."""
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="numpy") as f:
                names = list(f.keys())
                header = data_start = None
                for name in names:
                    if f.get_slice(name).get_dtype() == "BF16":
                        if header is None:
                            header, data_start = _header(path)
                        yield name, _bf16_to_f32(path, header[name], data_start), path
                    else:
                        yield name, f.get_tensor(name), path
        except (SafetensorError, OSError) as e:
            raise ModelError(f"{path}: cannot read as safetensors (truncated or damaged file?): {e}") from None
