"""Token + position embedding.

    out[b, t] = wte[idx[b, t]] + wpe[t]        wte (V, C), wpe (maxT, C), idx (B, T) -> (B, T, C)
"""

import numpy as np


def encoder_forward_ref(wte: np.ndarray, wpe: np.ndarray, idx: np.ndarray) -> np.ndarray:
    T = idx.shape[1]
    return wte[idx] + wpe[:T]


def encoder_backward_ref(dwte: np.ndarray, dwpe: np.ndarray, dout: np.ndarray, idx: np.ndarray) -> None:
    """Adds into dwte and dwpe (the tied wte also collects the classifier's gradient)."""
    B, T, C = dout.shape
    np.add.at(dwte, idx.ravel(), dout.reshape(B * T, C))
    dwpe[:T] += dout.sum(axis=0)


# ---- CUDA ------------------------------------------------------------------------------------
import koifish_cuda.compat  # noqa: E402,F401  (before numba compiles)
from koifish_cuda.bf16 import load, load_4, store, store_4  # noqa: E402
from koifish_cuda.vload import aligned, red_add4  # noqa: E402
from numba import cuda, float32, uint32  # noqa: E402


@cuda.jit(cache=True)
def encoder_forward_vec_kernel(out, idx, wte, wpe):
    """out (N, C) float32 or bf16 bits: a block walks rows, its threads across a row four columns each
    (16-byte loads of wte and wpe); the row's position and token found once a row, in 32-bit arithmetic."""
    T = uint32(idx.shape[1])
    N = uint32(out.shape[0])
    Q = uint32(out.shape[1] // 4)
    for row in range(uint32(cuda.blockIdx.x), N, uint32(cuda.gridDim.x)):
        t = row % T
        tok = uint32(idx[row // T, t])
        for q in range(uint32(cuda.threadIdx.x), Q, uint32(cuda.blockDim.x)):
            c = q * uint32(4)
            w0, w1, w2, w3 = load_4(wte, (tok, c))
            p0, p1, p2, p3 = load_4(wpe, (t, c))
            store_4(out, (row, c), w0 + p0, w1 + p1, w2 + p2, w3 + p3)


@cuda.jit(cache=True)
def encoder_backward_vec_kernel(dwte, dwpe, dout, idx):
    """A thread a (position, four columns): the batch's rows at that position read with one load each,
    each added to its token's dwte row with one vector reduction, their sum added to dwpe once (the
    thread is its only writer: no atomics there)."""
    B = uint32(idx.shape[0])
    T = uint32(idx.shape[1])
    Q = uint32(dout.shape[1] // 4)
    for tq in range(uint32(cuda.grid(1)), T * Q, uint32(cuda.gridsize(1))):
        t = tq // Q
        c = (tq % Q) * uint32(4)
        s0 = s1 = s2 = s3 = float32(0.0)
        for b in range(B):
            g0, g1, g2, g3 = load_4(dout, (b * T + t, c))
            red_add4(dwte, (uint32(idx[b, t]), c), g0, g1, g2, g3)
            s0 += g0
            s1 += g1
            s2 += g2
            s3 += g3
        p0, p1, p2, p3 = load_4(dwpe, (t, c))
        store_4(dwpe, (t, c), p0 + s0, p1 + s1, p2 + s2, p3 + s3)


@cuda.jit(cache=True)
def encoder_forward_kernel(out, idx, wte, wpe):
    """out (N, C) float32 or bf16 bits, N = B*T rows; a 2-D grid: columns x (b, t). Any C and alignment."""
    B, T = idx.shape
    C = out.shape[1]
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if c < C:
        for row in range(cuda.blockIdx.y, B * T, cuda.gridDim.y):
            b, t = row // T, row % T  # once per row, not per element
            store(out, (row, c), wte[idx[b, t], c] + wpe[t, c])


@cuda.jit(cache=True)
def encoder_backward_kernel(dwte, dwpe, dout, idx):
    """Atomic adds: rows sharing a token (or a position) add into the same weights. Any C and alignment;
    dout float32 or bf16 bits."""
    N, C = dout.shape
    T = idx.shape[1]
    i = cuda.grid(1)
    if i < N * C:
        row, c = i // C, i % C
        b, t = row // T, row % T
        g = load(dout, (row, c))
        cuda.atomic.add(dwte, (idx[b, t], c), g)
        cuda.atomic.add(dwpe, (t, c), g)


def _quads(*arrays) -> bool:
    """The four-column kernels apply: C a multiple of 4, every row on a 16-byte boundary (8 for bf16)."""
    return arrays[0].shape[-1] % 4 == 0 and all(aligned(a, 4) for a in arrays)


# GPT-2 124M B=16 on the H200 (profile_kernels.py, stop 19): the element-wise kernels took 0.126 ms forward
# (100 MB moved: ~30% of copy) and 0.103 ms backward (25M scalar atomics), the four-column ones 0.083 ms
# together (bench_kernels at B=8: forward 95%, backward 109% of copy).
def encoder_forward(out, idx, wte, wpe, stream=0):
    N, C = out.shape
    if _quads(out, wte, wpe):
        encoder_forward_vec_kernel[min(N, 2048), min(256, -(-C // 128) * 32), stream](out, idx, wte, wpe)
        return
    encoder_forward_kernel[((C + 255) // 256, min(N, 65535)), 256, stream](out, idx, wte, wpe)


def encoder_backward(dwte, dwpe, dout, idx, stream=0):
    T, C = idx.shape[1], dout.shape[1]
    if _quads(dout, dwte, dwpe) and dwte.dtype == np.float32:
        encoder_backward_vec_kernel[-(-T * C // 4 // 128), 128, stream](dwte, dwpe, dout, idx)
        return
    n = dout.shape[0] * dout.shape[1]
    encoder_backward_kernel[(n + 255) // 256, 256, stream](dwte, dwpe, dout, idx)
