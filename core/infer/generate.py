"""Autoregressive generation with the NumPy models: greedy (temperature 0) or sampled."""

from __future__ import annotations

import numpy as np


def sample_next(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """One token from the last position's logits (V,)."""
    if temperature == 0 or top_k == 1:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    return int(rng.choice(z.size, p=p))


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             seed: int | None = None, on_token=None) -> list[int]:
    """New token ids after the prompt. The context is cropped to the model's n_ctx."""
    rng = np.random.default_rng(seed)
    ids = list(map(int, prompt_ids))
    n_ctx = model.config.n_ctx
    new = []
    for _ in range(max_new_tokens):
        window = np.array([ids[-n_ctx:]])
        logits, _ = model.forward(window)
        tok = sample_next(logits[0, -1], temperature, top_k, rng)
        ids.append(tok)
        new.append(tok)
        if on_token is not None:
            on_token(tok)
    return new
