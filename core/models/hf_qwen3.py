"""Hugging Face Qwen3 folders -> the NumPy Qwen3, tensor by tensor.

Reads plain fp32/bf16/fp16 weights, koifish's own quantized folders (`koifish quantize`), and the
pre-quantized AWQ (GEMM, 4-bit) and GPTQ (4/8-bit) folders Qwen publishes. With `bits`, plain
weights are quantized as they stream in, so a model never sits in host memory at full width;
embeddings and the head take their own widths (embed_bits, head_bits; None keeps them float).

stream_weights is the one reader and checker of a folder: load_hf_folder keeps what it yields on the
host, koifish_core.infer.qwen3_gpu_load puts it on the GPU (quantizing there).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
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


def quantized_at_load(bits: int | None, shape) -> bool:
    """Whether a plain tensor of this shape is quantized as it loads: matrices given a width under 16 bits."""
    return bits is not None and bits < 16 and len(shape) == 2


def _fit(array: np.ndarray, shape, bits: int | None, group_size: int, dtype):
    if not quantized_at_load(bits, shape):
        return np.ascontiguousarray(array, dtype=dtype)
    return quantize_weight(np.asarray(array, dtype=np.float32), bits, group_size)


def host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class FolderPlan:
    """A Qwen3 folder as known before its weights stream: what config.json says and each weight's width."""

    folder: Path
    config: Qwen3Config
    quant: StoredQuant | None
    """How the folder stores its weights (None: plain float tensors)."""
    shapes: dict
    """Every weight's shape, by koifish name."""
    width: dict
    """Bits each plain weight is quantized to at load (None or >= 16: kept float; vectors always are)."""


def plan_folder(folder: str | Path, bits: int | None = None, embed_bits: int | None = None,
                head_bits: int | None = None) -> FolderPlan:
    """Read config.json and decide each weight's width (a stored-quantized folder keeps its own codes)."""
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
    return FolderPlan(folder, config, quant, shapes, width)


def weight_bytes(plan: FolderPlan, float_bytes: int) -> int:
    """About how many bytes the weights take as loaded: float ones at float_bytes an element, quantized ones
    at bits/8 plus ~1/32 for their scales and zeros (stored-quantized linears counted as 4-bit)."""
    need = 0
    for name, shape in plan.shapes.items():
        stored = plan.quant is not None and name not in ("embed_tokens", "lm_head") and len(shape) == 2
        bits = 4 if stored else plan.width[name]
        per = bits / 8 + 1 / 32 if quantized_at_load(bits, shape) else float_bytes
        need += int(np.prod(shape) * per)
    return need


def _check_memory(plan: FolderPlan, dtype) -> None:
    """Refuse up front a load that cannot fit, rather than swapping for an hour."""
    need = weight_bytes(plan, np.dtype(dtype).itemsize)
    have = host_memory_bytes()
    if have is not None and need > 0.9 * have:
        raise ModelError(f"{plan.folder}: needs about {need / 2**30:.1f} GiB of memory on the CPU path as loaded, "
                         f"this machine has {have / 2**30:.1f} GiB; load with --bits 4 (or `koifish quantize` it once)")


def stream_weights(plan: FolderPlan, fit, on_tensor=None) -> Iterator[tuple[str, object]]:
    """(koifish name, weight) for every weight of the folder, read one tensor at a time and checked against
    config.json as it comes (ModelError naming the file and tensor; at the end, the weights still missing).

    Plain tensors become fit(name, array, bits) with bits = plan.width[name] (what the caller keeps: a host
    array, a QuantizedWeight, a device matrix); stored-quantized ones come assembled as QuantizedWeight.
    on_tensor(name, index, total) reports progress (total counts the model's weights)."""
    shapes, quant = plan.shapes, plan.quant
    done: set[str] = set()
    pending: dict[str, dict] = {}
    for hf_name, array, path in iter_tensors(plan.folder):
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
                yield module, _assemble(pending.pop(module), quant, module, shapes[module], path)
                done.add(module)
        elif name in shapes:
            if tuple(array.shape) != shapes[name]:
                raise ModelError(f"{path}: tensor {hf_name}: expected shape {shapes[name]} from config.json, "
                                 f"got {tuple(array.shape)}")
            yield name, fit(name, array, plan.width[name])
            done.add(name)
        elif name == "lm_head" and plan.config.tie_word_embeddings:
            continue  # some tied checkpoints still carry a copy of the embedding
        elif part == "bias" and module in shapes and not np.any(array):
            continue  # GPTQ packers write zero biases for every linear; they change nothing
        else:
            raise ModelError(f"{path}: unexpected tensor {hf_name} (not part of a Qwen3 with this config.json)")
        del array  # freed before the next tensor is read: one float tensor in host memory at a time
        if on_tensor is not None:
            on_tensor(name, len(done), len(shapes))
    for module, parts in pending.items():  # GPTQ folders without g_idx: contiguous groups
        yield module, _assemble(parts, quant, module, shapes[module], plan.folder)
        done.add(module)
    missing = [n for n in shapes if n not in done]
    if missing:
        shown = ", ".join(("model." if n != "lm_head" else "") + n + ("" if n.endswith(".bias") else ".weight")
                          for n in missing[:5])
        raise ModelError(f"{plan.folder}: {len(missing)} weights missing, e.g. {shown}")


def load_hf_folder(folder: str | Path, bits: int | None = None, group_size: int = 128, embed_bits: int | None = None,
                   head_bits: int | None = None, dtype=np.float32, on_tensor=None) -> Qwen3:
    """Qwen3 from a Hugging Face folder. bits quantizes plain linear weights at load (8, 4 or 3).

    on_tensor(name, index, total) reports progress (total counts the model's weights).
    koifish_core.infer.qwen3_gpu_load reads the same stream straight onto the GPU.
    """
    plan = plan_folder(folder, bits, embed_bits, head_bits)
    _check_memory(plan, dtype)

    def fit(name, array, width):
        return _fit(array, plan.shapes[name], width, group_size, dtype)

    return Qwen3(plan.config, dict(stream_weights(plan, fit, on_tensor)), dtype)
