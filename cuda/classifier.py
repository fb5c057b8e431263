"""Softmax cross-entropy over the vocabulary, fused with its gradient.

    logits (N, V) , targets (N,) -> losses (N,), dlogits = (softmax - onehot) * dloss
The GPU kernel does both in one pass and writes dlogits over the logits, so probabilities and
logits never exist side by side; the reference below computes the same numbers. Both also raise
max_logit[0] to the largest logit seen (the softmax needs each row's maximum anyway): logits that
grow without bound are an instability signal, and once dlogits overwrite them they are gone.
"""

import numpy as np


def crossentropy_forward_ref(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-row losses; rows are the last axis."""
    m = logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=-1)) + m[..., 0]
    return lse - np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def fused_classifier_ref(logits: np.ndarray, targets: np.ndarray, dloss: float, inplace: bool = False,
                         max_logit: np.ndarray | None = None):
    """Returns (losses, dlogits). dloss is the gradient of the total loss w.r.t. each row's loss
    (1/N for a mean). With inplace=True the logits buffer is overwritten by dlogits. max_logit (a
    1-element array), when given, is raised to the largest logit (NaN counts as missing, as in
    cuda.atomic.max), so one buffer collects the maximum over several calls."""
    probs = logits if inplace else logits.copy()
    row_max = probs.max(axis=-1, keepdims=True)
    if max_logit is not None and row_max.size:
        max_logit[0] = np.fmax(max_logit[0], np.nanmax(row_max) if not np.isnan(row_max).all() else np.nan)
    probs -= row_max
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
from koifish_cuda.bf16 import load, store  # noqa: E402
from koifish_cuda.reduce import NEG_INF, THREADS, block_max, block_sum  # noqa: E402
from numba import cuda, float32  # noqa: E402


@cuda.jit(cache=True, fastmath=True)  # __expf: 2 ulp, far inside what a loss and its gradient need
def fused_classifier_kernel(logits, losses, loss_sum, targets, V, dloss, max_logit):
    """One block per row of logits (N, Vp): loss of the row, and the row overwritten by
    dloss * (softmax - onehot) over the first V columns, 0 over the padding. loss_sum[0]
    collects the mean loss (dloss = 1/N); max_logit[0] is raised to the row's largest logit
    (one atomic per row; the caller resets it to -inf when a new maximum is wanted). The maximum
    and the sum of exponentials come from one pass (each thread rescales its sum when its
    maximum grows), so the row is read twice, not three times."""
    N, Vp = logits.shape
    buf = cuda.shared.array(THREADS, float32)
    row, tid = cuda.blockIdx.x, cuda.threadIdx.x
    mt = NEG_INF
    st = float32(0.0)
    for j in range(tid, V, THREADS):
        x = load(logits, (row, j))
        if x > mt:
            st = st * math.exp(mt - x) + float32(1.0)
            mt = x
        else:
            st += math.exp(x - mt)
    m = block_max(mt, buf)
    s = block_sum(st * math.exp(mt - m), buf)
    tgt = targets[row]
    loss = math.log(s) + m - load(logits, (row, tgt))
    cuda.syncthreads()  # every thread has read logits[row, tgt] before it is overwritten
    inv = float32(1.0) / s
    for j in range(tid, Vp, THREADS):
        if j < V:
            p = math.exp(load(logits, (row, j)) - m) * inv
            store(logits, (row, j), (p - (float32(1.0) if j == tgt else float32(0.0))) * dloss)
        else:
            store(logits, (row, j), float32(0.0))
    if tid == 0:
        losses[row] = loss
        cuda.atomic.add(loss_sum, 0, loss * dloss)
        cuda.atomic.max(max_logit, 0, m)


def fused_classifier(logits, losses, loss_sum, targets, V, dloss, stream=0, max_logit=None):
    """max_logit: a 1-element float32 device buffer raised to the largest logit of these rows
    (None: a scratch buffer, not recorded)."""
    if max_logit is None:  # a scratch maximum, nobody's
        max_logit = koifish_cuda.compat.device_constant((1,), np.float32)
    fused_classifier_kernel[logits.shape[0], THREADS, stream](logits, losses, loss_sum, targets, V, np.float32(dloss),
                                                              max_logit)  # float32: a Python float is float64
