"""Softmax cross-entropy over the vocabulary, fused with its gradient.

    logits (N, V) , targets (N,) -> losses (N,), dlogits = (softmax - onehot) * dloss
The GPU kernel does both in one pass and writes dlogits over the logits, so probabilities and
logits never exist side by side; the reference below computes the same numbers.
"""

import numpy as np


def crossentropy_forward_ref(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-row losses; rows are the last axis."""
    m = logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=-1)) + m[..., 0]
    return lse - np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def fused_classifier_ref(logits: np.ndarray, targets: np.ndarray, dloss: float, inplace: bool = False):
    """Returns (losses, dlogits). dloss is the gradient of the total loss w.r.t. each row's loss
    (1/N for a mean). With inplace=True the logits buffer is overwritten by dlogits."""
    probs = logits if inplace else logits.copy()
    probs -= probs.max(axis=-1, keepdims=True)
    np.exp(probs, out=probs)
    sums = probs.sum(axis=-1, keepdims=True)
    probs /= sums
    rows = np.arange(targets.size)
    flat = probs.reshape(-1, probs.shape[-1])
    t = targets.ravel()
    losses = -np.log(np.maximum(flat[rows, t], np.finfo(probs.dtype).tiny)).reshape(targets.shape)
    flat[rows, t] -= 1.0
    probs *= dloss
    return losses, probs
