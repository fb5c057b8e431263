"""Linear layer with weights stored (out, in), as llm.c and PyTorch's nn.Linear.

    out = x @ W.T + b        x (N, C), W (OC, C), b (OC,) -> (N, OC)
On the GPU these are cuBLAS(Lt) GEMMs (cublas_raw.py, cublaslt.py: the training engine fuses the bias
into the GEMM's epilogue); this is the reference the engine is checked against. add_bias is the
unfused form (no engine calls it since the epilogues; kept with its test as the reference
kernel); bias_grad computes the bias gradients the engine does not get for free (the LayerNorm
backward sums the projections' ones).
"""

import numpy as np


def matmul_forward_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    out = x @ w.T
    if b is not None:
        out += b
    return out


def matmul_backward_ref(dout: np.ndarray, x: np.ndarray, w: np.ndarray):
    """Returns (dx, dw, db) for dout (N, OC)."""
    return dout @ w, dout.T @ x, dout.sum(axis=0)


# ---- CUDA ------------------------------------------------------------------------------------
# The products themselves are cuBLAS GEMMs (koifish_cuda.cublas_raw); these kernels do the rest.
import koifish_cuda.compat  # noqa: E402,F401
from koifish_cuda.bf16 import load, store, word_hi, word_lo  # noqa: E402
from koifish_cuda.vload import aligned, load4, red_add4  # noqa: E402
from numba import cuda, float32, uint32  # noqa: E402


@cuda.jit(cache=True)
def add_bias_kernel(out, bias):
    """out (N, C) float32 or bf16 bits += bias; a 2-D grid (columns x rows): no index division."""
    N, C = out.shape
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if c < C:
        b = bias[c]
        for r in range(cuda.blockIdx.y, N, cuda.gridDim.y):
            store(out, (r, c), load(out, (r, c)) + b)


@cuda.jit(cache=True)
def bias_grad_kernel(dbias, dout, rows_per_block):
    """dbias += column sums of dout (N, C): a thread per column over a slab of rows, one atomic
    add per column per slab (coalesced reads across the threads of a block)."""
    N, C = dout.shape
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if c >= C:
        return
    start = cuda.blockIdx.y * rows_per_block
    s = float32(0.0)
    for r in range(start, min(start + rows_per_block, N)):
        s += load(dout, (r, c))
    cuda.atomic.add(dbias, c, s)


@cuda.jit(cache=True)
def bias_grad_pairs_kernel(dbias, words, rows_per_block):
    """bias_grad_kernel on bf16 rows read as 32-bit words (two columns a thread, one load)."""
    N, W = words.shape
    j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if j >= W:
        return
    start = cuda.blockIdx.y * rows_per_block
    lo = float32(0.0)
    hi = float32(0.0)
    for r in range(start, min(start + rows_per_block, N)):
        u = words[r, j]
        lo += word_lo(u)
        hi += word_hi(u)
    cuda.atomic.add(dbias, 2 * j, lo)
    cuda.atomic.add(dbias, 2 * j + 1, hi)


R4 = 4  # rows whose 16-byte loads bias_grad_groups_kernel issues before it adds any
RG = 4  # its blocks' row groups (128 threads each): their sums meet in shared memory before any atomic
GROUP_SUMS = RG * 8 * 128  # (a shared array's size must be a plain constant, not an expression)


@cuda.jit(device=True, inline=True)
def _add_words(acc, u, q):
    """acc[0..7] += the eight bf16 columns of row q's four words u[q, 0..3]."""
    for e in range(4):
        acc[2 * e] += word_lo(u[q, e])
        acc[2 * e + 1] += word_hi(u[q, e])


@cuda.jit(cache=True)
def bias_grad_groups_kernel(dbias, words, rows_per_block):
    """dbias += column sums of bf16 rows (N, W words), W a multiple of 4, rows and dbias on 16-byte
    boundaries. A block of 128 x RG threads takes 1024 columns of a slab of rows: thread (c, g) eight
    columns (a 16-byte load a row, R4 rows in flight) of the slab's rows g, g + RG, ...; the RG groups'
    sums are added in shared memory and the block adds each column once (red.global.add.v4): RG times
    fewer atomics than a block of one row group, for the same threads reading."""
    N, W = words.shape
    t = cuda.threadIdx.x
    c, g = t % 128, t // 128
    j = 4 * (cuda.blockIdx.x * 128 + c)
    part = cuda.shared.array(GROUP_SUMS, float32)  # [g][e][c]: no bank conflicts
    acc = cuda.local.array(8, float32)
    u = cuda.local.array((R4, 4), uint32)
    for e in range(8):
        acc[e] = float32(0.0)
    start = cuda.blockIdx.y * rows_per_block
    end = min(start + rows_per_block, N)
    if j < W:
        r = start + g
        while r + (R4 - 1) * RG < end:
            for q in range(R4):
                u[q, 0], u[q, 1], u[q, 2], u[q, 3] = load4(words, (r + q * RG, j))
            for q in range(R4):
                _add_words(acc, u, q)
            r += R4 * RG
        while r < end:  # the slab's last rows of this group
            u[0, 0], u[0, 1], u[0, 2], u[0, 3] = load4(words, (r, j))
            _add_words(acc, u, 0)
            r += RG
    for e in range(8):
        part[(g * 8 + e) * 128 + c] = acc[e]
    cuda.syncthreads()
    if g == 0 and j < W:
        for e in range(8):
            for q in range(1, RG):
                acc[e] += part[(q * 8 + e) * 128 + c]
        red_add4(dbias, 2 * j, acc[0], acc[1], acc[2], acc[3])
        red_add4(dbias, 2 * j + 4, acc[4], acc[5], acc[6], acc[7])


def add_bias(out, bias, stream=0):
    N, C = out.shape
    add_bias_kernel[((C + 255) // 256, min(N, 65535)), 256, stream](out, bias)


def bias_grad(dbias, dout, stream=0, rows_per_block=64, vector=False, group_rows=128):
    """dbias += dout's column sums, in slabs of 64 rows (at 16384 x 2304 bf16 on an H200: 16 rows
    0.059 ms, 32 0.038, 64 0.030; 256-row slabs left most of the GPU idle). bf16 rows of even
    width are read two columns a 32-bit load (2-byte loads kept the kernel at 57% of copy; 32-bit
    loads reach 87%). vector (bf16 rows of a multiple of 8 columns, aligned; dbias aligned): eight
    columns a 16-byte load, in blocks of RG row groups over slabs of group_rows rows
    (bias_grad_groups_kernel, the engine's): at 16384 x 3072 on an H200 0.039 -> 0.029 ms (128-row slabs;
    256: 0.028, 512: 0.037), at 16384 x 2304 0.029 -> 0.021 (256: 0.023); a block of one row group over
    64-row slabs had gained 3% (stop 19): the atomics, not the loads, held it (bench_kernels --sweep)."""
    N, C = dout.shape
    if vector and dout.dtype == np.uint16 and C % 8 == 0 and aligned(dout, 8) and aligned(dbias, 4):
        grid = ((C // 8 + 127) // 128, (N + group_rows - 1) // group_rows)
        bias_grad_groups_kernel[grid, 128 * RG, stream](dbias, dout.view(np.uint32), group_rows)
        return
    rows = (N + rows_per_block - 1) // rows_per_block
    if dout.dtype == np.uint16 and C % 2 == 0 and aligned(dout, 2):  # rows of whole 32-bit words
        bias_grad_pairs_kernel[((C // 2 + 127) // 128, rows), 128, stream](dbias, dout.view(np.uint32), rows_per_block)
        return
    bias_grad_kernel[((C + 127) // 128, rows), 128, stream](dbias, dout, rows_per_block)
