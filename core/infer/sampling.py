"""Next-token sampling in NumPy, with transformers' semantics and order (the reference for GPU sampling).

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw
Filters set logits to -inf; each keeps at least one token. Temperature 0 is greedy (argmax of
the penalized logits). A seeded Sampler draws the same tokens on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from koifish_core.errors import KoifishError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    """Divides the logits; 0 means greedy."""
    top_k: int = 0
    """Keep the k most likely tokens (ties at the k-th kept); 0 = off."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p; 1 = off."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; 0 = off."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the context (positive logits divided, negative multiplied)."""
    seed: int | None = None
    """Seed of the sampler's generator; None draws a fresh one."""

    def check(self) -> "SamplingParams":
        """Self, or a KoifishError naming the first bad value."""
        problems = [(self.temperature < 0, f"temperature: expected >= 0, got {self.temperature}"),
                    (self.top_k < 0, f"top_k: expected >= 0, got {self.top_k}"),
                    (not 0 < self.top_p <= 1, f"top_p: expected 0 < top_p <= 1, got {self.top_p}"),
                    (not 0 <= self.min_p <= 1, f"min_p: expected 0..1, got {self.min_p}"),
                    (self.repetition_penalty <= 0, f"repetition_penalty: expected > 0, got {self.repetition_penalty}")]
        for bad, message in problems:
            if bad:
                raise KoifishError(f"sampling {message}")
        return self


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def apply_repetition_penalty(logits: np.ndarray, previous_ids, penalty: float) -> np.ndarray:
    if penalty == 1.0 or previous_ids is None or len(previous_ids) == 0:
        return logits
    out = logits.copy()
    seen = np.unique(np.asarray(previous_ids, dtype=np.int64))
    s = out[seen]
    out[seen] = np.where(s < 0, s * penalty, s / penalty)
    return out


def filter_logits(logits: np.ndarray, p: SamplingParams, previous_ids=None) -> np.ndarray:
    """Float64 logits (V,) after penalty, temperature and the filters; removed tokens are -inf."""
    z = apply_repetition_penalty(np.asarray(logits, dtype=np.float64), previous_ids, p.repetition_penalty)
    if p.temperature == 0:
        return z
    z = z / p.temperature
    if 0 < p.top_k < z.size:
        kth = np.partition(z, -p.top_k)[-p.top_k]
        z = np.where(z < kth, -np.inf, z)
    if p.top_p < 1.0:
        order = np.argsort(z, kind="stable")  # ascending, as transformers sorts
        cumulative = np.cumsum(_softmax(z[order]))
        drop = cumulative <= 1.0 - p.top_p
        drop[-1] = False  # the most likely token always stays
        z = z.copy()
        z[order[drop]] = -np.inf
    if p.min_p > 0.0:
        probs = _softmax(z)
        drop = probs < p.min_p * probs.max()
        drop[np.argmax(z)] = False
        z = np.where(drop, -np.inf, z)
    return z


def sample_token(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator, previous_ids=None) -> int:
    z = filter_logits(logits, p, previous_ids)
    if p.temperature == 0:
        return int(np.argmax(z))
    probs = _softmax(z)
    return int(rng.choice(probs.size, p=probs))


class Sampler:
    """Draws tokens with fixed params and its own generator (seeded: reproducible)."""

    def __init__(self, params: SamplingParams):
        self.params = params.check()
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, previous_ids=None) -> int:
        return sample_token(logits, self.params, self.rng, previous_ids)
