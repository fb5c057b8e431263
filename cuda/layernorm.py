"""LayerNorm over the last axis (biased variance, eps 1e-5, as GPT-2).

    out = (x - mean) * rstd * w + b,  rstd = 1 / sqrt(var + eps)      x (..., C) -> out (..., C)
"""

import numpy as np

EPS = 1e-5


def layernorm_forward_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = EPS):
    """Returns (out, mean, rstd); mean and rstd have shape x.shape[:-1] and feed the backward."""
    mean = x.mean(axis=-1)
    xc = x - mean[..., None]
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1) + eps)
    return xc * rstd[..., None] * w + b, mean, rstd


def layernorm_backward_ref(dout: np.ndarray, x: np.ndarray, w: np.ndarray, mean: np.ndarray, rstd: np.ndarray):
    """Returns (dx, dw, db)."""
    norm = (x - mean[..., None]) * rstd[..., None]
    dnorm = dout * w
    dx = rstd[..., None] * (dnorm - dnorm.mean(axis=-1, keepdims=True)
                            - norm * (dnorm * norm).mean(axis=-1, keepdims=True))
    axes = tuple(range(dout.ndim - 1))
    return dx, (dout * norm).sum(axis=axes), dout.sum(axis=axes)


# ---- CUDA ------------------------------------------------------------------------------------
import math  # noqa: E402

import koifish_cuda.compat  # noqa: E402,F401
import numpy as np  # noqa: E402

from koifish_cuda.bf16 import store  # noqa: E402
from koifish_cuda.reduce import THREADS, block_sum, warp_sum  # noqa: E402
from numba import cuda, float32  # noqa: E402


ROWS = 8  # rows per block in the forward: a warp each
BUF = 32 * ROWS  # a compile-time constant for the shared array


@cuda.jit(cache=True)
def layernorm_forward_kernel(out, mean, rstd, x, w, b, eps):
    """A warp per row of x (N, C), reduced with shuffles: a whole block per row spent its time in
    the barriers of two shared-memory reductions (46% of copy bandwidth at C=768). out float32 or
    bf16 bits (the operand of a bf16 GEMM)."""
    N, C = x.shape
    buf = cuda.shared.array(BUF, float32)
    lane = cuda.threadIdx.x % 32
    row = cuda.blockIdx.x * ROWS + cuda.threadIdx.x // 32
    live = row < N
    s = float32(0.0)
    if live:
        for c in range(lane, C, 32):
            s += x[row, c]
    m = warp_sum(s, buf) / C
    s = float32(0.0)
    if live:
        for c in range(lane, C, 32):
            d = x[row, c] - m
            s += d * d
    r = float32(1.0) / math.sqrt(warp_sum(s, buf) / C + eps)
    if live:
        for c in range(lane, C, 32):
            store(out, (row, c), (x[row, c] - m) * r * w[c] + b[c])
        if lane == 0:
            mean[row] = m
            rstd[row] = r


@cuda.jit(cache=True)
def layernorm_backward_kernel(dx, dx16, dw, db, dout, x, w, mean, rstd):
    """A block walks rows (grid-stride); each thread owns columns t, t+THREADS, ... and keeps
    their dw/db partial sums in registers, so the block adds into dw/db once, not once per row.
    dx16, unless it has no rows, gets a bf16 copy of the new dx (the bf16 GEMMs' operand)."""
    N, C = x.shape
    copy = dx16.shape[0] > 0
    buf = cuda.shared.array(THREADS, float32)
    t = cuda.threadIdx.x
    acc_w = cuda.local.array(16, float32)  # C <= 16 * THREADS
    acc_b = cuda.local.array(16, float32)
    for k in range(16):
        acc_w[k] = 0.0
        acc_b[k] = 0.0
    for row in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        m, r = mean[row], rstd[row]
        a = float32(0.0)
        bs = float32(0.0)
        k = 0
        for c in range(t, C, THREADS):
            n = (x[row, c] - m) * r
            g = dout[row, c]
            dn = g * w[c]
            a += dn
            bs += dn * n
            acc_w[k] += g * n
            acc_b[k] += g
            k += 1
        a = block_sum(a, buf) / C
        bs = block_sum(bs, buf) / C
        for c in range(t, C, THREADS):
            n = (x[row, c] - m) * r
            g = dx[row, c] + r * (dout[row, c] * w[c] - a - n * bs)  # += : dx also carries the residual path
            dx[row, c] = g
            if copy:
                store(dx16, (row, c), g)
    k = 0
    for c in range(t, C, THREADS):
        cuda.atomic.add(dw, c, acc_w[k])
        cuda.atomic.add(db, c, acc_b[k])
        k += 1


def layernorm_forward(out, mean, rstd, x, w, b, stream=0, eps=EPS):
    layernorm_forward_kernel[(x.shape[0] + ROWS - 1) // ROWS, 32 * ROWS, stream](out, mean, rstd, x, w, b, eps)


_no_copy = {}  # device id -> a (0, 1) uint16 array: "no bf16 copy of dx"


def layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, stream=0, blocks=528, dx16=None):
    """Adds into dx, dw and db; dx16 (bf16 bits, dx's shape), if given, receives a copy of the new dx."""
    if x.shape[1] > 16 * THREADS:
        raise ValueError(f"layernorm_backward supports widths up to {16 * THREADS}, got {x.shape[1]}")
    if dx16 is None:
        dev = getattr(cuda.get_current_device(), "id", 0)  # the simulator's device has no id
        if dev not in _no_copy:
            _no_copy[dev] = cuda.device_array((0, 1), np.uint16)
        dx16 = _no_copy[dev]
    layernorm_backward_kernel[min(blocks, x.shape[0]), THREADS, stream](dx, dx16, dw, db, dout, x, w, mean, rstd)
