"""Hugging Face folders by model_type: the one place that knows which loader reads which model."""

from __future__ import annotations

from pathlib import Path

from koifish_core.errors import ModelError

SUPPORTED = ("gpt2", "qwen3")


def load_model(folder: str | Path, gpu_engine: dict | None = None, **options):
    """(model, kind) for a Hugging Face folder; kind is its model_type.

    options go to the Qwen3 loader (bits, group_size, embed_bits, head_bits, on_tensor). With gpu_engine
    (Qwen3GPU keyword arguments), a Qwen3 streams straight onto the GPU engine; GPT-2 loads on the host."""
    from koifish_core.models.hf_gpt2 import read_config

    folder = Path(folder)
    model_type = read_config(folder).get("model_type")
    if model_type == "gpt2":
        if options:
            raise ModelError(f"{folder}: {', '.join(options)} apply to Qwen3 folders only; this is GPT-2")
        from koifish_core.models.hf_gpt2 import load_hf_folder

        return load_hf_folder(folder), "gpt2"
    if model_type == "qwen3" and gpu_engine is not None:
        from koifish_core.infer.qwen3_gpu_load import load_folder_gpu

        return load_folder_gpu(folder, **options, **gpu_engine), "qwen3"
    if model_type == "qwen3":
        from koifish_core.models.hf_qwen3 import load_hf_folder as load_qwen3

        return load_qwen3(folder, **options), "qwen3"
    raise ModelError(f"{folder}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED)}")
