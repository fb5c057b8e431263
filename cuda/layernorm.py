"""LayerNorm over the last axis (biased variance, eps 1e-5, as GPT-2).

    out = (x - mean) * rstd * w + b,  rstd = 1 / sqrt(var + eps)      x (..., C) -> out (..., C)
"""

import numpy as np

EPS = 1e-5


def layernorm_forward_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = EPS):
    """Returns (out, mean, rstd); mean and rstd have shape x.shape[:-1] and feed the backward."""
    mean = x.mean(axis=-1)
    xc = x - mean[..., None]
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1) + eps)
    return xc * rstd[..., None] * w + b, mean, rstd


def layernorm_backward_ref(dout: np.ndarray, x: np.ndarray, w: np.ndarray, mean: np.ndarray, rstd: np.ndarray):
    """Returns (dx, dw, db)."""
    norm = (x - mean[..., None]) * rstd[..., None]
    dnorm = dout * w
    dx = rstd[..., None] * (dnorm - dnorm.mean(axis=-1, keepdims=True)
                            - norm * (dnorm * norm).mean(axis=-1, keepdims=True))
    axes = tuple(range(dout.ndim - 1))
    return dx, (dout * norm).sum(axis=axes), dout.sum(axis=axes)
