"""`koifish generate`: open a model, tokenize the prompt, sample, decode."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from koifish_core.errors import KoifishError


@dataclass
class GenerateResult:
    ids: list[int]
    text: str | None


def parse_prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise KoifishError(f"--prompt-ids: expected comma-separated token ids like 1,2,3, got {text!r}") from None
    if not ids:
        raise KoifishError("--prompt-ids: expected at least one token id")
    return ids


def generate_from_path(model_path: Path, *, prompt: str | None, prompt_ids: str | None, max_new_tokens: int,
                       temperature: float, top_k: int | None, seed: int | None, device: str = "cpu",
                       on_text=None, kv_bits: int = 16, act_bits: int | None = None) -> GenerateResult:
    from koifish_core.infer.generate import generate
    from koifish_core.models.from_path import open_model

    if (prompt is None) == (prompt_ids is None):
        raise KoifishError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    from koifish_core.infer.qwen3_gpu import engine_options, resolve_device

    requested, device = device, resolve_device(device)
    options = engine_options(kv_bits, act_bits, device == "cuda", "this generation", requested)
    if temperature < 0:
        raise KoifishError(f"--temperature: expected 0 (greedy) or a positive number, got {temperature}")
    if max_new_tokens <= 0:
        raise KoifishError(f"--max-new-tokens: expected a positive number, got {max_new_tokens}")
    opened = open_model(model_path, gpu_engine=options if device == "cuda" else None)
    enc = opened.encoding
    if prompt is not None:
        if enc is None:
            raise KoifishError(f"{model_path}: this model folder has no tokenizer files; use --prompt-ids 1,2,3")
        ids = enc.encode(prompt, allowed_special="all")
    else:
        ids = parse_prompt_ids(prompt_ids)
    vocab = getattr(opened.model.config, "vocab_size", None)
    if vocab is not None and max(ids) >= vocab:
        raise KoifishError(f"--prompt-ids: token id {max(ids)} is outside the model's vocabulary of {vocab}")
    if kv_bits != 16 and opened.kind != "qwen3":
        raise KoifishError(f"--kv-bits {kv_bits}: the int8 KV cache is the Qwen3 GPU engine's; {model_path} is "
                           f"{opened.kind}")
    if device == "cuda" and opened.kind == "qwen3":
        new_ids = _generate_gpu(opened.model, ids, max_new_tokens, temperature, top_k, seed)
    elif device == "cuda" and requested == "cuda":
        raise KoifishError(f"--device cuda: the GPU generation engine runs Qwen3 models; {model_path} is "
                           f"{opened.kind} (use --device cpu)")
    else:
        new_ids = generate(opened.model, ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    text = enc.decode(new_ids) if enc is not None else None
    if on_text is not None and text is not None:
        on_text(text)
    return GenerateResult(ids=list(map(int, new_ids)), text=text)


def _generate_gpu(engine, ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None,
                  seed: int | None) -> list[int]:
    """On a Qwen3GPU engine: prefill once, then one CUDA-graph replay per token with sampling on the device."""
    import numpy as np

    from koifish_core.infer.sampling import SamplingParams

    need = len(ids) + max_new_tokens
    if need > engine.config.n_ctx:
        raise KoifishError(f"--max-new-tokens: prompt ({len(ids)}) + new tokens ({max_new_tokens}) exceed the "
                           f"model's context of {engine.config.n_ctx}")
    cache = engine.new_cache(1, need)
    engine.set_sampling(SamplingParams(temperature=temperature, top_k=top_k or 0, seed=seed), seed)
    new = [int(engine.prefill_sample(np.array([ids]), cache)[0])]
    while len(new) < max_new_tokens:
        new.append(int(engine.decode_sample(cache)[0]))
    return new
