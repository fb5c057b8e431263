"""Tiny random Qwen3 models built with transformers (the reference), saved as Hugging Face folders."""

from __future__ import annotations

import numpy as np


def tiny_hf_qwen3(tie: bool = False, kv_heads: int = 2, seed: int = 0, vocab: int = 200):
    """A float32 transformers Qwen3ForCausalLM: hidden 64, 2 layers, 4 heads of 16, SwiGLU 128."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16, tie_word_embeddings=tie,
                      max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # norms start at 1; perturb so their weights matter
                p.add_(torch.randn_like(p) * 0.2)
            elif "embed_tokens" not in name:  # HF's init (std 0.02) gives near-uniform logits
                p.mul_(4.0)
    return model


def hf_logits(model, idx: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(idx), dtype=torch.long)).logits.float().numpy()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()
