"""SwiGLU on the fused gate|up projection: out[r, i] = silu(gu[r, i]) * gu[r, F + i].

The decode step computes gate and up in one GEMV over the row-concatenated weight (2F, C), so
its output holds gate in columns [0, F) and up in [F, 2F). The prefill's variant reads and writes
bf16 bits (uint16): GEMM output in, the next GEMM's operand out; swiglu_x16 (batch 1) also rounds its
output to int8 for the down projection's W4A8 GEMV (quant_a8).
"""

from __future__ import annotations

import math

import numpy as np

import koifish_cuda.compat  # noqa: F401
from koifish_cuda.pdl import aware, begin
from koifish_cuda.compat import nb
from koifish_cuda.bf16 import bf16_to_f32, f32_to_bf16
from koifish_cuda.prefetch import lines_or_none, prefetch_blocks, prefetch_share
from koifish_cuda.quant_a8 import CHUNK, store_rounded
from koifish_cuda.vload import aligned, load4, store4
from numba import cuda, float32, uint32


def swiglu_ref(gu: np.ndarray) -> np.ndarray:
    gu = np.asarray(gu, np.float64)
    F = gu.shape[1] // 2
    g = gu[:, :F]
    return g / (1.0 + np.exp(-g)) * gu[:, F:]


@aware
@cuda.jit(cache=True)
def swiglu_kernel(out, gu):
    begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
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


@aware
@cuda.jit(cache=True)
def swiglu_bf16_kernel(out2, gu2):
    """out2 (R, F/2) and gu2 (R, F) uint32: bf16 values two to a word, float32 math; 2-D grid (word
    columns x rows, grid-stride): 4-byte accesses, no index division."""
    begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
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


@aware
@cuda.jit(cache=True)
def swiglu_x16_kernel(out, xq, xs, xsum, gu, pf):
    """One thread a chunk of 16 of one row's h: its SwiGLU written as float32 and rounded to int8; the
    blocks past the chunks prefetch pf into L2."""
    begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
    F = out.shape[1]
    work = (F // CHUNK + cuda.blockDim.x - 1) // cuda.blockDim.x
    if cuda.blockIdx.x >= work:
        prefetch_share(pf, cuda.blockIdx.x - work, cuda.gridDim.x - work)
        return
    t = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if t < F // CHUNK:
        c0 = t * CHUNK
        v = cuda.local.array(CHUNK, float32)
        xw = cuda.local.array(4, uint32)
        for j in range(0, CHUNK, 4):
            g0, g1, g2, g3 = load4(gu, (0, c0 + j))
            u0, u1, u2, u3 = load4(gu, (0, F + c0 + j))
            v[j] = g0 / (float32(1.0) + math.exp(-g0)) * u0
            v[j + 1] = g1 / (float32(1.0) + math.exp(-g1)) * u1
            v[j + 2] = g2 / (float32(1.0) + math.exp(-g2)) * u2
            v[j + 3] = g3 / (float32(1.0) + math.exp(-g3)) * u3
            store4(out, (0, c0 + j), v[j], v[j + 1], v[j + 2], v[j + 3])
        store_rounded(v, t, xq, xs, xsum, xw)


def swiglu_x16(out, xq, gu, stream=0, prefetch=None):
    """swiglu of one row, also rounded into xq = (codes (F/4,), scales (F/16,), sums (F/16,)) as
    quant_a8.quantize_x16 rounds it: the decode step's SwiGLU and its down GEMV's rounding in one kernel.
    prefetch: as rmsnorm.add_rmsnorm_x16's."""
    R, F = out.shape
    if R != 1 or F % CHUNK or gu.shape != (1, 2 * F) or xq[0].shape[0] * 4 != F or xq[1].shape[0] * CHUNK != F:
        raise ValueError(f"swiglu_x16: one row of a multiple of {CHUNK} values, gu (1, 2F) and the triple; got "
                         f"out {out.shape}, gu {gu.shape}, codes {xq[0].shape}, scales {xq[1].shape}")
    if not all(aligned(a, 4) for a in (out, gu, xq[0])):
        raise ValueError("swiglu_x16: every array must start on a 16-byte boundary")
    n = F // CHUNK
    pf = lines_or_none(prefetch, gu)
    swiglu_x16_kernel[(n + 127) // 128 + prefetch_blocks(pf, 128), 128, stream](out, *xq, gu, pf)
