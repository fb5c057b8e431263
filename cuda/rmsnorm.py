"""RMSNorm with the residual add fused in front (Qwen3's pre-norm blocks).

    x += delta            (optional: the previous sublayer's output joins the residual stream)
    out = w * (x / sqrt(mean(x^2) + eps))

One block per row (128 threads, or up to 1024 for the few rows of a decode step); float32
throughout, as transformers computes Qwen3's RMSNorm.
"""

from __future__ import annotations

import math

import numpy as np

import koifish_cuda.compat  # noqa: F401
from koifish_cuda.compat import nb
from koifish_cuda.bf16 import f32_to_bf16
from koifish_cuda.reduce import THREADS, block_sum
from numba import config, cuda, float32


def add_rmsnorm_ref(x: np.ndarray, delta: np.ndarray | None, w: np.ndarray, eps: float):
    """(new x, out) in float64."""
    x = np.asarray(x, np.float64) + (0.0 if delta is None else np.asarray(delta, np.float64))
    rstd = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    return x, np.asarray(w, np.float64) * (x * rstd)


THREADS_MAX = 1024  # a block of a few rows (decode): wide, so each thread's loads are few


@cuda.jit(cache=True)
def add_rmsnorm_kernel(out, x, delta, w, eps, add, as_bf16):
    """A block per row, any multiple of 32 threads. The first pass only loads (x is written in the
    second, with the same sum recomputed): no store orders one turn's loads after the last's."""
    r = cuda.blockIdx.x
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    C = x.shape[1]
    buf = cuda.shared.array(THREADS_MAX, float32)
    ss = float32(0.0)
    for i in range(t, C, nt):
        v = x[r, i]
        if add:
            v += delta[r, i]
        ss += v * v
    total = block_sum(ss, buf)
    rstd = float32(1.0) / math.sqrt(total / float32(C) + eps)
    for i in range(t, C, nt):
        v = x[r, i]
        if add:
            v += delta[r, i]
            x[r, i] = v
        y = w[i] * (v * rstd)
        if as_bf16:
            out[r, i] = f32_to_bf16(y)
        else:
            out[r, i] = y


def add_rmsnorm(out, x, delta, w, eps: float, stream=0):
    """out (R, C) = rmsnorm(x (+= delta)) * w; delta None normalizes x as it is. out is float32, or uint16
    for bf16 bits (the operand of the prefill's GEMMs, rounded as koifish_cuda.bf16.to_bf16_ref)."""
    add = delta is not None
    R, C = x.shape
    wide = R < 64 and not config.ENABLE_CUDASIM  # a few rows: one wide block each (the simulator keeps 128)
    threads = min(THREADS_MAX, max(THREADS, 1 << (C // 4 - 1).bit_length())) if wide else THREADS  # a power of two
    add_rmsnorm_kernel[R, threads, stream](nb(out), nb(x), nb(delta if add else x), nb(w), np.float32(eps), add,
                                           out.dtype == np.uint16)
