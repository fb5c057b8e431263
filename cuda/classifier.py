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


# ---- CUDA ------------------------------------------------------------------------------------
import math  # noqa: E402

import koifish_cuda.compat  # noqa: E402,F401
from koifish_cuda.reduce import NEG_INF, THREADS, block_max, block_sum  # noqa: E402
from numba import cuda, float32  # noqa: E402


@cuda.jit(cache=True)
def fused_classifier_kernel(logits, losses, loss_sum, targets, V, dloss):
    """One block per row of logits (N, Vp): loss of the row, and the row overwritten by
    dloss * (softmax - onehot) over the first V columns, 0 over the padding. loss_sum[0]
    collects the mean loss (dloss = 1/N)."""
    N, Vp = logits.shape
    buf = cuda.shared.array(THREADS, float32)
    row, tid = cuda.blockIdx.x, cuda.threadIdx.x
    m = NEG_INF
    for j in range(tid, V, THREADS):
        m = max(m, logits[row, j])
    m = block_max(m, buf)
    s = float32(0.0)
    for j in range(tid, V, THREADS):
        s += math.exp(logits[row, j] - m)
    s = block_sum(s, buf)
    tgt = targets[row]
    loss = math.log(s) + m - logits[row, tgt]
    cuda.syncthreads()  # every thread has read logits[row, tgt] before it is overwritten
    inv = float32(1.0) / s
    for j in range(tid, Vp, THREADS):
        if j < V:
            p = math.exp(logits[row, j] - m) * inv
            logits[row, j] = (p - (1.0 if j == tgt else 0.0)) * dloss
        else:
            logits[row, j] = 0.0
    if tid == 0:
        losses[row] = loss
        cuda.atomic.add(loss_sum, 0, loss * dloss)


def fused_classifier(logits, losses, loss_sum, targets, V, dloss, stream=0):
    fused_classifier_kernel[logits.shape[0], THREADS, stream](logits, losses, loss_sum, targets, V, dloss)
