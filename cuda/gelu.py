"""GELU, tanh approximation (GPT-2's "gelu_new").

    y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
"""

import numpy as np

GELU_SCALE = float(np.sqrt(2.0 / np.pi))


def gelu_forward_ref(x: np.ndarray) -> np.ndarray:
    x2 = x * x  # x*x*x rather than x**3: numpy's float power is several times slower
    return 0.5 * x * (1.0 + np.tanh(GELU_SCALE * x * (1.0 + 0.044715 * x2)))


def gelu_backward_ref(x: np.ndarray, dout: np.ndarray) -> np.ndarray:
    x2 = x * x
    t = np.tanh(GELU_SCALE * x * (1.0 + 0.044715 * x2))
    dtanh = GELU_SCALE * (1.0 + 3 * 0.044715 * x2)
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dtanh)


# ---- CUDA ------------------------------------------------------------------------------------
import math  # noqa: E402

import koifish_cuda.compat  # noqa: E402,F401
from koifish_cuda.bf16 import load, pack_word, rounded, store, word_hi, word_lo  # noqa: E402
from koifish_cuda.vload import aligned, load4, store4  # noqa: E402
from numba import cuda, float32  # noqa: E402

# float32 constants: Python floats would make the arithmetic, and tanh with it, float64 on the GPU
S32, A32, A3_32 = np.float32(GELU_SCALE), np.float32(0.044715), np.float32(3 * 0.044715)
HALF, ONE, TWO = np.float32(0.5), np.float32(1.0), np.float32(2.0)


@cuda.jit(device=True, inline=True)
def _tanh(u):
    """tanh(u) = 1 - 2 / (exp(2u) + 1): __expf and a fast division under fastmath (error ~1e-7
    absolute; exp's overflow for large u still gives 1, its underflow -1)."""
    return ONE - TWO / (math.exp(TWO * u) + ONE)


# Launched as a 2-D grid (columns x rows) so no thread divides its index by the row length:
# 64-bit integer division costs more than the arithmetic of the kernel itself.
@cuda.jit(cache=True, fastmath=True)
def bias_gelu_forward_kernel(out, pre, bias, add):
    """pre += bias if add (kept for the backward), out = gelu(pre); pre, out (N, F), float32 or bf16 bits."""
    N, F = pre.shape
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if c < F:
        for r in range(cuda.blockIdx.y, N, cuda.gridDim.y):
            x = load(pre, (r, c))
            if add:
                x = rounded(pre, x + float32(bias[c]))  # as the backward will read it
                store(pre, (r, c), x)
            store(out, (r, c), _gelu(x))


@cuda.jit(device=True, inline=True)
def _gelu(x):
    return HALF * x * (ONE + _tanh(S32 * x * (ONE + A32 * x * x)))


@cuda.jit(cache=True, fastmath=True)
def gelu_pairs_kernel(out, pre):
    """out = gelu(pre) over bf16 rows read and written as 32-bit words (two values a thread), a
    grid-stride over the flat words: 2-byte loads and a block per 256 values of a row ran at 21%
    of copy bandwidth."""
    n = pre.size
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        u = pre[i]
        out[i] = pack_word(_gelu(word_lo(u)), _gelu(word_hi(u)))


@cuda.jit(cache=True, fastmath=True)
def gelu_quads_kernel(out, pre):
    """gelu_pairs_kernel with four words (eight values) a 16-byte load and store: the pairs' 4-byte
    accesses need four times the loads in flight for the same bytes. The flat words start aligned to
    16 bytes; a length not a multiple of four ends in single words."""
    n = pre.size
    quads = n // 4
    for q in range(cuda.grid(1), quads, cuda.gridsize(1)):
        u0, u1, u2, u3 = load4(pre, 4 * q)
        store4(out, 4 * q, pack_word(_gelu(word_lo(u0)), _gelu(word_hi(u0))),
               pack_word(_gelu(word_lo(u1)), _gelu(word_hi(u1))), pack_word(_gelu(word_lo(u2)), _gelu(word_hi(u2))),
               pack_word(_gelu(word_lo(u3)), _gelu(word_hi(u3))))
    i = 4 * quads + cuda.grid(1)
    if i < n:
        u = pre[i]
        out[i] = pack_word(_gelu(word_lo(u)), _gelu(word_hi(u)))


@cuda.jit(cache=True, fastmath=True)
def gelu_backward_kernel(dpre, pre, dout):
    N, F = pre.shape
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if c < F:
        for r in range(cuda.blockIdx.y, N, cuda.gridDim.y):
            x = load(pre, (r, c))
            t = _tanh(S32 * x * (ONE + A32 * x * x))
            dt = S32 * (ONE + A3_32 * x * x)
            store(dpre, (r, c), load(dout, (r, c)) * (HALF * (ONE + t) + HALF * x * (ONE - t * t) * dt))


def _packed(a) -> bool:
    """Rows of an even number of bf16 values, one after the other: the flat array is whole 32-bit words."""
    return a.ndim == 2 and a.flags.c_contiguous and aligned(a, 2)


def _grid(N, F):
    return ((F + 255) // 256, min(N, 65535))


def bias_gelu_forward(out, pre, bias, stream=0):
    bias_gelu_forward_kernel[_grid(*pre.shape), 256, stream](out, pre, bias, True)


def gelu_forward(out, pre, stream=0, vector=True):
    """out = gelu(pre), pre left as it is (the training engine's GELU after its c_fc GEMM, or its rebuild
    under remat 1). bf16 rows of even widths go two values a 32-bit word: eight a 16-byte access where
    both arrays start on a 16-byte boundary (vector), else two."""
    if out.dtype == pre.dtype == np.uint16 and _packed(out) and _packed(pre) and out.shape == pre.shape:
        o, p = out.reshape(-1).view(np.uint32), pre.reshape(-1).view(np.uint32)
        if vector and aligned(o, 4) and aligned(p, 4):
            grid = koifish_cuda.compat.stride_blocks((o.size // 4 + 255) // 256, 8192)
            gelu_quads_kernel[grid, 256, stream](o, p)
            return
        grid = koifish_cuda.compat.stride_blocks((o.size + 255) // 256, 8192)
        gelu_pairs_kernel[grid, 256, stream](o, p)
        return
    bias_gelu_forward_kernel[_grid(*pre.shape), 256, stream](out, pre, pre[0], False)


def gelu_backward(dpre, pre, dout, stream=0):
    gelu_backward_kernel[_grid(*pre.shape), 256, stream](dpre, pre, dout)
