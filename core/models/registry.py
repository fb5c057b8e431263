"""Hugging Face folders by model_type: the one place that knows which loader reads which model."""

from __future__ import annotations

from pathlib import Path

from koifish_core.errors import ModelError

SUPPORTED = ("gpt2", "qwen3")


def load_model(folder: str | Path):
    """(model, kind) for a Hugging Face folder; kind is its model_type."""
    from koifish_core.models.hf_gpt2 import read_config

    folder = Path(folder)
    model_type = read_config(folder).get("model_type")
    if model_type == "gpt2":
        from koifish_core.models.hf_gpt2 import load_hf_folder

        return load_hf_folder(folder), "gpt2"
    if model_type == "qwen3":
        try:
            from koifish_core.models.hf_qwen3 import load_hf_folder as load_qwen3
        except ImportError:
            raise ModelError(f"{folder}: Qwen3 support is not in this build yet") from None
        return load_qwen3(folder), "qwen3"
    raise ModelError(f"{folder}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED)}")
