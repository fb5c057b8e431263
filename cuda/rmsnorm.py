"""RMSNorm with the residual add fused in front (Qwen3's pre-norm blocks).

    x += delta            (optional: the previous sublayer's output joins the residual stream)
    out = w * (x / sqrt(mean(x^2) + eps))

One block per row; float32 throughout, as transformers computes Qwen3's RMSNorm.
"""

from __future__ import annotations

import math

import numpy as np

import koifish_cuda.compat  # noqa: F401
from koifish_cuda.compat import nb
from koifish_cuda.reduce import THREADS, block_sum
from numba import cuda, float32


def add_rmsnorm_ref(x: np.ndarray, delta: np.ndarray | None, w: np.ndarray, eps: float):
    """(new x, out) in float64."""
    x = np.asarray(x, np.float64) + (0.0 if delta is None else np.asarray(delta, np.float64))
    rstd = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    return x, np.asarray(w, np.float64) * (x * rstd)


@cuda.jit(cache=True)
def add_rmsnorm_kernel(out, x, delta, w, eps, add):
    r = cuda.blockIdx.x
    t = cuda.threadIdx.x
    C = x.shape[1]
    buf = cuda.shared.array(THREADS, float32)
    ss = float32(0.0)
    for i in range(t, C, THREADS):
        v = x[r, i]
        if add:
            v += delta[r, i]
            x[r, i] = v
        ss += v * v
    total = block_sum(ss, buf)
    rstd = float32(1.0) / math.sqrt(total / float32(C) + eps)
    for i in range(t, C, THREADS):
        out[r, i] = w[i] * (x[r, i] * rstd)


def add_rmsnorm(out, x, delta, w, eps: float, stream=0):
    """out (R, C) = rmsnorm(x (+= delta)) * w; delta None normalizes x as it is."""
    add = delta is not None
    add_rmsnorm_kernel[x.shape[0], THREADS, stream](nb(out), nb(x), nb(delta if add else x), nb(w),
                                                       np.float32(eps), add)
