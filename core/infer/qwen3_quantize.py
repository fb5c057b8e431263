"""`koifish quantize MODEL --bits 4 --out DIR`: a quantized copy of a Qwen3 folder that loads in seconds.

Streams the source tensor by tensor; each linear weight becomes NAME.qweight / NAME.scales /
NAME.qzeros (the layout in koifish_core.infer.quant), written in shards of at most
max_shard_bytes. Norms stay float32; embeddings and head are quantized only when asked
(embed_bits, head_bits), else stored as fp16 (exact for bf16 sources within fp16's range).
config.json gains quantization_config {"quant_method": "koifish", ...}; tokenizer and
generation files are copied. The folder appears under its name only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from koifish_core.errors import ModelError
from koifish_core.infer.quant import QuantizedWeight, quantize_weight
from koifish_core.models.hf_qwen3 import config_from_hf, koifish_name, read_json
from koifish_core.models.qwen3 import LINEARS
from koifish_core.models.safetensors_reader import iter_tensors

SUPPORTED_BITS = (8, 4, 3)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
FP16_MAX = 65504.0


def _bits_for(name: str, bits: int, embed_bits, head_bits):
    if name == "embed_tokens":
        return embed_bits
    if name == "lm_head":
        return head_bits
    return bits if name.endswith(LINEARS) else None


def _stored(hf_name: str, array: np.ndarray, bits, group_size: int) -> dict[str, np.ndarray]:
    base = hf_name.removesuffix(".weight")
    if bits is not None and bits < 16:
        qw: QuantizedWeight = quantize_weight(np.asarray(array, np.float32), bits, group_size)
        parts = {base + ".qweight": qw.packed, base + ".scales": qw.scales, base + ".qzeros": qw.zeros}
        # C order: safetensors writes an array's memory as it lies
        return {k: np.ascontiguousarray(v) for k, v in parts.items()}
    if array.ndim == 2 and np.all(np.abs(array) < FP16_MAX):
        return {hf_name: np.ascontiguousarray(array, np.float16)}
    return {hf_name: np.ascontiguousarray(array, np.float32)}


def quantize_folder(src: str | Path, out: str | Path, bits: int = 4, group_size: int = 128,
                    embed_bits: int | None = None, head_bits: int | None = None,
                    max_shard_bytes: int = 2 << 30, on_tensor=None) -> Path:
    src, out = Path(src), Path(out)
    for flag, value in (("--bits", bits), ("embed bits", embed_bits), ("head bits", head_bits)):
        if value is not None and value not in SUPPORTED_BITS:
            raise ModelError(f"{flag}: expected one of {', '.join(map(str, SUPPORTED_BITS))}, got {value}")
    cfg = read_json(src / "config.json")
    config_from_hf(cfg, src / "config.json")  # refuses non-Qwen3 folders before any work
    if cfg.get("quantization_config"):
        raise ModelError(f"{src}: already quantized ({cfg['quantization_config'].get('quant_method')}); "
                         "quantize the original bf16 folder instead")
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out}: exists and is not empty; choose a new --out folder")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    shards: list[tuple[Path, list[str]]] = []
    buffer: dict[str, np.ndarray] = {}

    def flush():
        if buffer:
            path = tmp / f"shard-{len(shards):05d}.safetensors"
            save_file(buffer, str(path))
            shards.append((path, list(buffer)))
            buffer.clear()

    for i, (hf_name, array, _) in enumerate(iter_tensors(src)):
        name = koifish_name(hf_name)
        if name == "lm_head" and cfg.get("tie_word_embeddings"):
            continue
        buffer.update(_stored(hf_name, array, _bits_for(name, bits, embed_bits, head_bits), group_size))
        if sum(a.nbytes for a in buffer.values()) >= max_shard_bytes:
            flush()
        if on_tensor is not None:
            on_tensor(hf_name, i + 1)
    flush()
    _finish_shards(tmp, shards)

    cfg["quantization_config"] = {"quant_method": "koifish", "bits": bits, "group_size": group_size,
                                  "embed_bits": embed_bits, "head_bits": head_bits}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for extra in src.iterdir():
        if extra.is_file() and extra.name not in WEIGHT_FILES + ("config.json",) and \
                not extra.name.endswith(".safetensors"):
            shutil.copy2(extra, tmp / extra.name)
    for f in tmp.glob("*.safetensors"):  # safetensors writes 0600; the other files of a model folder are 0644
        f.chmod(0o644)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def _finish_shards(tmp: Path, shards: list[tuple[Path, list[str]]]) -> None:
    """One file is model.safetensors; several get HF's shard names and an index."""
    if len(shards) == 1:
        shards[0][0].rename(tmp / "model.safetensors")
        return
    weight_map = {}
    for k, (path, names) in enumerate(shards):
        final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        path.rename(tmp / final)
        weight_map.update(dict.fromkeys(names, final))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
