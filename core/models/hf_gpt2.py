"""Hugging Face GPT-2 folders: config.json + model.safetensors, in and out.

HF stores the linear layers as Conv1D, weight (in, out); koifish stores (out, in), so those
four matrices per block are transposed on the way. Older checkpoints (openai-community/gpt2)
name tensors without the `transformer.` prefix and carry `attn.bias` mask buffers: both load.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from koifish_core.errors import ModelError
from koifish_core.models.gpt2 import GPT2, GPT2Config

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise ModelError(f"{folder}: no such model folder")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{folder}: no config.json (a Hugging Face model folder has config.json and model.safetensors)") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None


def config_from_hf(cfg: dict, where: Path) -> GPT2Config:
    if cfg.get("model_type") != "gpt2":
        raise ModelError(f"{where}: model_type {cfg.get('model_type')!r} is not gpt2")
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ModelError(f"{where}: activation_function {act!r} is not supported; GPT-2 uses gelu_new (tanh)")
    try:
        return GPT2Config(vocab_size=int(cfg["vocab_size"]), n_ctx=int(cfg.get("n_positions", cfg.get("n_ctx", 1024))),
                          n_layer=int(cfg["n_layer"]), n_head=int(cfg["n_head"]), n_embd=int(cfg["n_embd"]),
                          ffn=cfg.get("n_inner"))
    except KeyError as e:
        raise ModelError(f"{where}/config.json: missing key {e.args[0]!r}") from None


def hf_name(name: str) -> str:
    return "lm_head.weight" if name == "lm_head" else f"transformer.{name}.weight" if name in ("wte", "wpe") else f"transformer.{name}"


def load_state_dict_into(model: GPT2, tensors: dict[str, np.ndarray], where: str) -> None:
    """Copy HF-named tensors (with or without the `transformer.` prefix) into the model."""
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    V = model.config.vocab_size
    for name, view in model.param_views().items():
        key = f"{name}.weight" if name in ("wte", "wpe") else name
        if key not in tensors:
            raise ModelError(f"{where}: tensor {hf_name(name)} is missing")
        t = np.asarray(tensors[key], dtype=np.float32 if model.dtype == np.float32 else model.dtype)
        if name.endswith(CONV1D):
            t = t.T
        target = view[:V] if name == "wte" else view
        if t.shape != target.shape:
            raise ModelError(f"{where}: tensor {hf_name(name)} has shape {tuple(t.shape)}, the config implies {target.shape}")
        target[...] = t


def load_hf_folder(folder: str | Path, dtype=np.float32) -> GPT2:
    from koifish_core.models.safetensors_reader import iter_tensors

    folder = Path(folder)
    cfg = config_from_hf(read_config(folder), folder)
    tensors = {name: array for name, array, _ in iter_tensors(folder)}  # single or sharded; bf16 widened
    model = GPT2(cfg, dtype=dtype)
    load_state_dict_into(model, tensors, str(folder))
    return model


def hf_state_dict(model: GPT2) -> dict[str, np.ndarray]:
    V = model.config.vocab_size
    out = {}
    for name, view in model.param_views().items():
        t = view[:V] if name == "wte" else view
        out[hf_name(name) if name in ("wte", "wpe") else f"transformer.{name}"] = np.ascontiguousarray(
            t.T if name.endswith(CONV1D) else t, dtype=np.float32)
    return out


def save_hf_folder(model: GPT2, folder: str | Path) -> Path:
    """config.json + model.safetensors that transformers' GPT2LMHeadModel.from_pretrained loads."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = model.config
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
        "n_positions": c.n_ctx, "n_ctx": c.n_ctx, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
        "n_inner": c.ffn, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": 0.02,
        "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True, "torch_dtype": "float32",
    }
    tmp = folder / ".model.safetensors.tmp"
    save_file(hf_state_dict(model), str(tmp), metadata={"format": "pt"})
    tmp.replace(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
