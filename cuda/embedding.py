"""Token + position embedding.

    out[b, t] = wte[idx[b, t]] + wpe[t]        wte (V, C), wpe (maxT, C), idx (B, T) -> (B, T, C)
"""

import numpy as np


def encoder_forward_ref(wte: np.ndarray, wpe: np.ndarray, idx: np.ndarray) -> np.ndarray:
    T = idx.shape[1]
    return wte[idx] + wpe[:T]


def encoder_backward_ref(dwte: np.ndarray, dwpe: np.ndarray, dout: np.ndarray, idx: np.ndarray) -> None:
    """Adds into dwte and dwpe (the tied wte also collects the classifier's gradient)."""
    B, T, C = dout.shape
    np.add.at(dwte, idx.ravel(), dout.reshape(B * T, C))
    dwpe[:T] += dout.sum(axis=0)
