"""Embedding lookup for inference: rows of a float table, or of a group-wise quantized one.

    out[r] = table[ids[r]]                       table (V, C) float32 or float16
    out[r] = (codes[ids[r]] - zero) * scale      packed table as in koifish_cuda.quant
ids is a device int32 buffer (the decode graph reads the token sampled by the previous step).
"""

from __future__ import annotations

import numpy as np

import koifish_cuda.compat  # noqa: F401
from koifish_cuda.pdl import aware, begin
from koifish_cuda.quant import _code
from koifish_cuda.reduce import THREADS
from numba import cuda, float32


def embed_rows_ref(table: np.ndarray, ids) -> np.ndarray:
    return np.asarray(table, np.float64)[np.asarray(ids).reshape(-1)]


@aware
@cuda.jit(cache=True)
def embed_dense_kernel(out, table, ids):
    begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
    r = cuda.blockIdx.x
    row = ids[r]
    for c in range(cuda.threadIdx.x, out.shape[1], THREADS):
        out[r, c] = float32(table[row, c])


@aware
@cuda.jit(cache=True)
def embed_quant_kernel(out, words, scales, zeros, ids, bits, group_size):
    begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
    r = cuda.blockIdx.x
    row = ids[r]
    mask = (1 << bits) - 1
    for c in range(cuda.threadIdx.x, out.shape[1] // 32, THREADS):
        g = (c * 32) // group_size
        s = scales[row, g]
        z = float32(zeros[row, g])
        for j in range(32):
            out[r, c * 32 + j] = (float32(_code(words, row, c, j, bits, mask)) - z) * s


def embed_rows(out, ids, table=None, quant=None, stream=0):
    """out (R, C) from ids (R,): a float `table`, or `quant` = (words, scales, zeros, bits, group_size)."""
    R = out.shape[0]
    if quant is None:
        embed_dense_kernel[R, THREADS, stream](out, table, ids)
    else:
        words, scales, zeros, bits, group_size = quant
        embed_quant_kernel[R, THREADS, stream](out, words, scales, zeros, ids, bits, group_size)
