"""SwiGLU on the fused gate|up projection: out[r, i] = silu(gu[r, i]) * gu[r, F + i].

The decode step computes gate and up in one GEMV over the row-concatenated weight (2F, C), so
its output holds gate in columns [0, F) and up in [F, 2F). The prefill's variant reads and writes
bf16 bits (uint16): GEMM output in, the next GEMM's operand out.
"""

from __future__ import annotations

import math

import numpy as np

import koifish_cuda.compat  # noqa: F401
from koifish_cuda.compat import nb
from koifish_cuda.bf16 import bf16_to_f32, f32_to_bf16
from numba import cuda, float32, uint32


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


@cuda.jit(device=True, inline=True)
def _swiglu_bf16_pair(g2, u2):
    """Two bf16 gate values and two up values, each pair packed in a uint32 -> their SwiGLU, packed."""
    out = uint32(0)
    for half in range(2):
        g = bf16_to_f32((g2 >> uint32(16 * half)) & uint32(0xFFFF))
        u = bf16_to_f32((u2 >> uint32(16 * half)) & uint32(0xFFFF))
        out |= uint32(f32_to_bf16(g / (float32(1.0) + math.exp(-g)) * u)) << uint32(16 * half)
    return out


@cuda.jit(cache=True)
def swiglu_bf16_kernel(out2, gu2):
    """out2 (R, F/2) and gu2 (R, F) uint32: bf16 values two to a word, float32 math; 2-D grid (word
    columns x rows, grid-stride): 4-byte accesses, no index division."""
    R, H = out2.shape
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if c < H:
        for r in range(cuda.blockIdx.y, R, cuda.gridDim.y):
            out2[r, c] = _swiglu_bf16_pair(gu2[r, c], gu2[r, H + c])


def swiglu(out, gu, stream=0):
    """out (R, F) from gu (R, 2F)."""
    n = out.shape[0] * out.shape[1]
    swiglu_kernel[(n + 255) // 256, 256, stream](out, gu)


def swiglu_bf16(out, gu, stream=0):
    """out (R, F) from gu (R, 2F), both bf16 bits (uint16, C-contiguous), F even."""
    R, F = out.shape
    if F % 2:
        raise ValueError(f"swiglu_bf16: the hidden width {F} must be even (values move two at a time)")
    H = F // 2
    grid = ((H + 255) // 256, koifish_cuda.compat.stride_blocks(R))
    swiglu_bf16_kernel[grid, 256, stream](nb(out.view(np.uint32)), nb(gu.view(np.uint32)))
