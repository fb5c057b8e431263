"""Hugging Face Qwen3 folders -> the NumPy Qwen3, tensor by tensor.

Reads plain fp32/bf16/fp16 weights, koifish's own quantized folders (`koifish quantize`), and the
pre-quantized AWQ (GEMM, 4-bit) and GPTQ (4/8-bit) folders Qwen publishes. With `bits`, plain
weights are quantized as they stream in, so a model never sits in host memory at full width;
embeddings and the head take their own widths (embed_bits, head_bits; None keeps them float).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from koifish_core.errors import ModelError
from koifish_core.infer.quant import QuantizedWeight, awq_unpack, gptq_unpack, quantize_weight
from koifish_core.models.qwen3 import Qwen3, Qwen3Config
from koifish_core.models.safetensors_reader import iter_tensors

QUANT_PARTS = ("qweight", "qzeros", "scales", "g_idx")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_json(path: Path) -> dict:
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ModelError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return value


def config_from_hf(cfg: dict, where: Path) -> Qwen3Config:
    if cfg.get("model_type") != "qwen3":
        raise ModelError(f"{where}: model_type {cfg.get('model_type')!r} is not qwen3")
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")  # transformers 5 writes rope_parameters
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ModelError(f"{where}: rope_scaling {scaling!r} is not supported; "
                         "koifish reads plain RoPE (rope_scaling null)")
    if cfg.get("use_sliding_window"):
        raise ModelError(f"{where}: use_sliding_window true is not supported (Qwen3 ships it false)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported; Qwen3 uses silu")
    try:
        n_head = int(cfg["num_attention_heads"])
        theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        return Qwen3Config(
            vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]), n_layer=int(cfg["num_hidden_layers"]),
            n_head=n_head, n_kv_head=int(cfg.get("num_key_value_heads") or n_head),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // n_head),
            rope_theta=float(theta), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            n_ctx=int(cfg.get("max_position_embeddings", 40960)))
    except KeyError as e:
        raise ModelError(f"{where}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ModelError(f"{where}: a value has the wrong type ({e})") from None


@dataclass(frozen=True)
class StoredQuant:
    """How a folder's weights are stored: config.json's quantization_config."""

    method: str
    """"awq", "gptq" or "koifish"."""
    bits: int
    group_size: int
    zero_offset: int = 0
    """GPTQ v1 stores zero - 1."""


def stored_quant(cfg: dict, where: Path) -> StoredQuant | None:
    q = cfg.get("quantization_config")
    if not q:
        return None
    method = str(q.get("quant_method", "")).lower()
    bits, group = int(q.get("bits", q.get("w_bit", 4))), int(q.get("group_size", q.get("q_group_size", 128)))
    if method == "awq":
        if str(q.get("version", "gemm")).lower() != "gemm" or bits != 4 or not q.get("zero_point", True):
            raise ModelError(f"{where}: quantization_config: AWQ {q.get('version')} {bits}-bit "
                             f"zero_point={q.get('zero_point')} is not supported; "
                             "expected version gemm, 4 bits, zero_point true")
        return StoredQuant("awq", 4, group)
    if method == "gptq":
        if bits not in (4, 8):
            raise ModelError(f"{where}: quantization_config.bits: GPTQ {bits}-bit is not supported; expected 4 or 8")
        v2 = str(q.get("checkpoint_format", "gptq")).lower() == "gptq_v2"
        return StoredQuant("gptq", bits, group, zero_offset=0 if v2 else 1)
    if method == "koifish":
        return StoredQuant("koifish", bits, group)
    raise ModelError(f"{where}: quantization_config.quant_method {method!r} is not supported; "
                     "expected awq, gptq or koifish")


def koifish_name(hf_name: str) -> str:
    """model.layers.0.self_attn.q_proj.weight -> layers.0.self_attn.q_proj; biases keep `.bias`."""
    name = hf_name.removeprefix("model.")
    return name.removesuffix(".weight")


def _assemble(parts: dict, quant: StoredQuant, module: str, shape, where: Path) -> QuantizedWeight:
    N, K = shape
    try:
        if quant.method == "awq":
            w = awq_unpack(parts["qweight"], parts["qzeros"], parts["scales"], quant.group_size)
        elif quant.method == "gptq":
            w = gptq_unpack(parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"), quant.bits,
                            quant.group_size, quant.zero_offset)
        else:
            group = K // parts["scales"].shape[1]
            bits = parts["qweight"].shape[1] * 8 // K
            w = QuantizedWeight(parts["qweight"], parts["scales"], parts["qzeros"], bits, group)
    except (KeyError, ValueError) as e:
        raise ModelError(f"{where}: {module}: incomplete or malformed {quant.method} tensors ({e})") from None
    if w.shape != (N, K):
        raise ModelError(f"{where}: {module}: {quant.method} tensors give shape {w.shape}, expected {(N, K)}")
    return w


def _fit(name: str, array: np.ndarray, shape, bits: int | None, group_size: int, dtype):
    if bits is None or bits >= 16 or len(shape) != 2:
        return np.ascontiguousarray(array, dtype=dtype)
    return quantize_weight(np.asarray(array, dtype=np.float32), bits, group_size)


def host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(config: Qwen3Config, width: dict, quant, dtype, folder: Path) -> None:
    """Refuse up front a load that cannot fit, rather than swapping for an hour."""
    item = np.dtype(dtype).itemsize
    need = 0
    for name, shape in config.shapes().items():
        bits = 4 if quant is not None and name not in ("embed_tokens", "lm_head") and len(shape) == 2 else width[name]
        per = item if bits is None or bits >= 16 or len(shape) != 2 else bits / 8 + 1 / 32
        need += int(np.prod(shape) * per)
    have = host_memory_bytes()
    if have is not None and need > 0.9 * have:
        raise ModelError(f"{folder}: needs about {need / 2**30:.1f} GiB of memory on the CPU path as loaded, this "
                         f"machine has {have / 2**30:.1f} GiB; load with --bits 4 (or `koifish quantize` it once)")


def load_hf_folder(folder: str | Path, bits: int | None = None, group_size: int = 128, embed_bits: int | None = None,
                   head_bits: int | None = None, dtype=np.float32, on_tensor=None) -> Qwen3:
    """Qwen3 from a Hugging Face folder. bits quantizes plain linear weights at load (8, 4 or 3).

    on_tensor(name, index, total) reports progress (total counts the model's weights).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such model folder")
    cfg_path = folder / "config.json"
    raw = read_json(cfg_path)
    config = config_from_hf(raw, cfg_path)
    quant = stored_quant(raw, cfg_path)
    if quant is not None and bits is not None:
        bits = None  # already quantized: keep the checkpoint's own codes
    shapes = config.shapes()
    width = {name: (embed_bits if name == "embed_tokens" else head_bits if name == "lm_head" else bits)
             for name in shapes}
    if config.tie_word_embeddings:
        width["embed_tokens"] = embed_bits if embed_bits is not None else head_bits
    _check_memory(config, width, quant, dtype, folder)
    weights: dict = {}
    pending: dict[str, dict] = {}
    for hf_name, array, path in iter_tensors(folder):
        if hf_name.endswith(IGNORED_SUFFIXES):
            continue
        name = koifish_name(hf_name)
        module, _, part = name.rpartition(".")
        if part in QUANT_PARTS and module in shapes:
            pending.setdefault(module, {})[part] = array
            if quant is None:
                raise ModelError(f"{path}: tensor {hf_name} is quantized but config.json has no quantization_config")
            needed = ("qweight", "qzeros", "scales") + (("g_idx",) if quant.method == "gptq" else ())
            if all(p in pending[module] for p in needed):
                weights[module] = _assemble(pending.pop(module), quant, module, shapes[module], path)
        elif name in shapes:
            if tuple(array.shape) != shapes[name]:
                raise ModelError(f"{path}: tensor {hf_name}: expected shape {shapes[name]} from config.json, "
                                 f"got {tuple(array.shape)}")
            weights[name] = _fit(name, array, shapes[name], width[name], group_size, dtype)
        elif name == "lm_head" and config.tie_word_embeddings:
            continue  # some tied checkpoints still carry a copy of the embedding
        elif part == "bias" and module in shapes and not np.any(array):
            continue  # GPTQ packers write zero biases for every linear; they change nothing
        else:
            raise ModelError(f"{path}: unexpected tensor {hf_name} (not part of a Qwen3 with this config.json)")
        if on_tensor is not None:
            on_tensor(name, len(weights), len(shapes))
    for module, parts in pending.items():  # GPTQ folders without g_idx: contiguous groups
        weights[module] = _assemble(parts, quant, module, shapes[module], folder)
    missing = [n for n in shapes if n not in weights]
    if missing:
        shown = ", ".join(("model." if n != "lm_head" else "") + n + ("" if n.endswith(".bias") else ".weight")
                          for n in missing[:5])
        raise ModelError(f"{folder}: {len(missing)} weights missing, e.g. {shown}")
    return Qwen3(config, weights, dtype)
