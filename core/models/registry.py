"""Hugging Face folders by model_type: the one place that knows which loader reads which model."""

from __future__ import annotations

from pathlib import Path

from koifish_core.errors import ModelError

SUPPORTED = ("gpt2", "qwen3")


def load_model(folder: str | Path, **options):
    """(model, kind) for a Hugging Face folder; kind is its model_type.

    options go to the Qwen3 loader (bits, group_size, embed_bits, head_bits, on_tensor)."""
    from koifish_core.models.hf_gpt2 import read_config

    folder = Path(folder)
    model_type = read_config(folder).get("model_type")
    if model_type == "gpt2":
        if options:
            raise ModelError(f"{folder}: {', '.join(options)} apply to Qwen3 folders only; this is GPT-2")
        from koifish_core.models.hf_gpt2 import load_hf_folder

        return load_hf_folder(folder), "gpt2"
    if model_type == "qwen3":
        from koifish_core.models.hf_qwen3 import load_hf_folder as load_qwen3

        return load_qwen3(folder, **options), "qwen3"
    raise ModelError(f"{folder}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED)}")
