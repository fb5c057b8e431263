"""AdamW over one flat parameter array (decoupled weight decay, masked to matrices).

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + lr * wd * mask * p
The GPU kernel does the same in one launch over all tensors; this is its reference.
"""

import numpy as np


def adamw_update_ref(params: np.ndarray, grads: np.ndarray, m: np.ndarray, v: np.ndarray, decay_mask: np.ndarray,
                     step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """In place on params, m and v; `step` counts from 1."""
    m *= beta1
    m += (1.0 - beta1) * grads
    v *= beta2
    v += (1.0 - beta2) * grads * grads
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    if weight_decay:
        params -= (lr * weight_decay) * np.where(decay_mask, params, 0.0).astype(params.dtype, copy=False)
    params -= (lr / bc1) * m / (np.sqrt(v / bc2) + eps)


def global_norm_ref(grads: np.ndarray) -> float:
    return float(np.sqrt(np.dot(grads.astype(np.float64, copy=False), grads.astype(np.float64, copy=False))))
