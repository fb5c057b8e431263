"""Open a chat session from what the user typed: MODEL name or folder, bits, sampling overrides.

Sampling defaults come from the folder's generation_config.json (Qwen3 ships temperature 0.6,
top_k 20, top_p 0.95: its recommendation for thinking mode); --temperature and --seed override.
Turns end at generation_config's eos_token_id, or at <|im_end|> / <|endoftext|>.
"""

from __future__ import annotations

import json
from pathlib import Path

from koifish_core.errors import KoifishError, ModelError
from koifish_core.infer.chat import ChatOptions, ChatSession
from koifish_core.infer.sampling import SamplingParams

END_OF_TURN = ("<|im_end|>", "<|endoftext|>")


def generation_defaults(folder: Path) -> dict:
    path = folder / "generation_config.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None


def sampling_from(gen: dict, temperature: float | None, seed: int | None) -> SamplingParams:
    greedy = gen.get("do_sample") is False
    return SamplingParams(
        temperature=temperature if temperature is not None else 0.0 if greedy else float(gen.get("temperature", 0.7)),
        top_k=int(gen.get("top_k") or 0), top_p=float(gen.get("top_p") or 1.0), min_p=float(gen.get("min_p") or 0.0),
        repetition_penalty=float(gen.get("repetition_penalty") or 1.0), seed=seed).check()


def stop_ids_of(gen: dict, tokenizer) -> set[int]:
    eos = gen.get("eos_token_id")
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    ids |= {tokenizer.added_tokens[t] for t in END_OF_TURN if t in getattr(tokenizer, "added_tokens", {})}
    return ids


def open_chat(model: str | Path, models_dir: str | Path | None = None, bits: int | None = None, device: str = "cpu",
              think: bool = True, max_new_tokens: int = 1024, temperature: float | None = None,
              seed: int | None = None, system: str | None = None, max_context: int | None = None,
              on_tensor=None, kv_bits: int = 16, act_bits: int | None = None) -> ChatSession:
    from koifish_core.infer.chat_template import load_chat_template
    from koifish_core.infer.model_resolve import resolve_model
    from koifish_core.infer.tokenizer_hf import load_tokenizer_json
    from koifish_core.models.hf_qwen3 import load_hf_folder, read_json

    from koifish_core.infer.qwen3_gpu import engine_options, resolve_device

    on_gpu = resolve_device(device) == "cuda"
    options = engine_options(kv_bits, act_bits, on_gpu, "this chat", device)
    if bits is not None and bits not in (8, 4, 3):
        raise KoifishError(f"--bits: expected 8, 4 or 3, got {bits}")
    folder = resolve_model(model, models_dir)
    model_type = read_json(folder / "config.json").get("model_type")
    if model_type != "qwen3":
        raise ModelError(f"{folder}: chat needs a Qwen3 model (model_type qwen3), this is {model_type!r}")
    if not (folder / "tokenizer.json").exists():
        raise ModelError(f"{folder}: no tokenizer.json; chat needs the model's tokenizer files")
    tokenizer = load_tokenizer_json(folder / "tokenizer.json")
    template = load_chat_template(folder)
    gen = generation_defaults(folder)
    if on_gpu:  # streamed onto the GPU and quantized there; decode as one CUDA graph, sampling on the device
        from koifish_core.infer.qwen3_gpu import GPU_DEFAULT_CONTEXT
        from koifish_core.infer.qwen3_gpu_load import load_folder_gpu

        net = load_folder_gpu(folder, bits=bits, on_tensor=on_tensor, **options)
        max_context = max_context or min(net.config.n_ctx, GPU_DEFAULT_CONTEXT)
    else:
        from koifish_core.models.hf_qwen3 import host_memory_bytes

        net = load_hf_folder(folder, bits=bits, on_tensor=on_tensor)
        memory = host_memory_bytes()
        if memory is not None:  # quantized weights stay small on disk; on the CPU, decode from float copies if they fit
            net.keep_dequantized(memory // 3)
    stop = stop_ids_of(gen, tokenizer)
    if not stop:
        raise ModelError(f"{folder}: no end-of-turn token (generation_config.json eos_token_id, or <|im_end|>)")
    options = ChatOptions(max_new_tokens=max_new_tokens, think=think, system=system,
                          sampling=sampling_from(gen, temperature, seed), max_context=max_context)
    return ChatSession(net, tokenizer, template, stop, options)
