"""SwiGLU on the fused gate|up projection: out[r, i] = silu(gu[r, i]) * gu[r, F + i].

The decode step computes gate and up in one GEMV over the row-concatenated weight (2F, C), so
its output holds gate in columns [0, F) and up in [F, 2F).
"""

from __future__ import annotations

import math

import numpy as np

import koifish_cuda.compat  # noqa: F401
from numba import cuda, float32


def swiglu_ref(gu: np.ndarray) -> np.ndarray:
    gu = np.asarray(gu, np.float64)
    F = gu.shape[1] // 2
    g = gu[:, :F]
    return g / (1.0 + np.exp(-g)) * gu[:, F:]


@cuda.jit(cache=True)
def swiglu_kernel(out, gu):
    R, F = out.shape
    i = cuda.grid(1)
    if i < R * F:
        r = i // F
        c = i % F
        g = gu[r, c]
        out[r, c] = g / (float32(1.0) + math.exp(-g)) * gu[r, F + c]


def swiglu(out, gu, stream=0):
    """out (R, F) from gu (R, 2F)."""
    n = out.shape[0] * out.shape[1]
    swiglu_kernel[(n + 255) // 256, 256, stream](out, gu)
