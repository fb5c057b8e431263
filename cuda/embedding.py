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
from koifish_cuda.bf16 import store  # noqa: E402
from numba import cuda  # noqa: E402


@cuda.jit(cache=True)
def encoder_forward_kernel(out, idx, wte, wpe):
    """out (N, C) float32 or bf16 bits, N = B*T rows; a 2-D grid: columns x (b, t)."""
    B, T = idx.shape
    C = out.shape[1]
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if c < C:
        for row in range(cuda.blockIdx.y, B * T, cuda.gridDim.y):
            b, t = row // T, row % T  # once per row, not per element
            store(out, (row, c), wte[idx[b, t], c] + wpe[t, c])


@cuda.jit(cache=True)
def encoder_backward_kernel(dwte, dwpe, dout, idx):
    """Atomic adds: rows sharing a token (or a position) add into the same weights."""
    N, C = dout.shape
    T = idx.shape[1]
    i = cuda.grid(1)
    if i < N * C:
        row, c = i // C, i % C
        b, t = row // T, row % T
        g = dout[row, c]
        cuda.atomic.add(dwte, (idx[b, t], c), g)
        cuda.atomic.add(dwpe, (t, c), g)


def encoder_forward(out, idx, wte, wpe, stream=0):
    N, C = out.shape
    encoder_forward_kernel[((C + 255) // 256, min(N, 65535)), 256, stream](out, idx, wte, wpe)


def encoder_backward(dwte, dwpe, dout, idx, stream=0):
    n = dout.shape[0] * dout.shape[1]
    encoder_backward_kernel[(n + 255) // 256, 256, stream](dwte, dwpe, dout, idx)
