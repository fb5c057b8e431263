"""Columns of rows gathered by a permutation: the input of a GPTQ act-order matrix.

    out[r, j] = x[r, perm[j]]        x (R, K), perm (K,) -> out (R, K)

An act-order checkpoint assigns input columns to groups out of order (g_idx). The GPU engine keeps
such a matrix packed with its columns reordered so every group is contiguous (W' = W[:, perm]),
and feeds it x[:, perm]: W' x' = W x. float32 or bf16 bits alike (a plain copy of elements).
"""

import numpy as np


def gather_columns_ref(x: np.ndarray, perm: np.ndarray) -> np.ndarray:
    return x[:, perm]


import koifish_cuda.compat  # noqa: E402,F401
from koifish_cuda.pdl import aware, begin  # noqa: E402
from numba import cuda  # noqa: E402


@aware
@cuda.jit(cache=True)
def gather_columns_kernel(out, x, perm):
    """A thread per output column (its source index read once), rows over the grid's y axis."""
    begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
    R, K = out.shape
    j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if j < K:
        src = perm[j]
        for r in range(cuda.blockIdx.y, R, cuda.gridDim.y):
            out[r, j] = x[r, src]


def gather_columns(out, x, perm, stream=0):
    R, K = out.shape
    if x.shape != out.shape or perm.shape != (K,) or x.dtype != out.dtype:
        raise ValueError(f"gather_columns: out {out.shape} {out.dtype}, x {x.shape} {x.dtype}, perm {perm.shape}")
    gather_columns_kernel[((K + 255) // 256, min(R, 65535)), 256, stream](out, x, perm)
