"""Causal multi-head self-attention over a fused qkv projection.

    qkv (B, T, 3C) -> q, k, v (B, nh, T, hs); att = softmax(q k^T / sqrt(hs), causal) (B, nh, T, T);
    out = att v -> (B, T, C)
"""

import numpy as np


def _split_heads(qkv: np.ndarray, n_head: int):
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    q, k, v = (qkv[..., i * C3 // 3:(i + 1) * C3 // 3].reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)
               for i in range(3))  # each (B, nh, T, hs)
    return q, k, v, hs


def attention_forward_ref(qkv: np.ndarray, n_head: int):
    """Returns (out (B, T, C), att (B, nh, T, T)); att is kept for the backward."""
    B, T, _ = qkv.shape
    q, k, v, hs = _split_heads(qkv, n_head)
    scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / np.sqrt(hs))  # (B, nh, T, T)
    scores[..., np.triu(np.ones((T, T), dtype=bool), k=1)] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    att = np.exp(scores, out=scores)
    att /= att.sum(axis=-1, keepdims=True)
    out = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, n_head * hs)
    return out, att


def attention_backward_ref(dout: np.ndarray, qkv: np.ndarray, att: np.ndarray, n_head: int) -> np.ndarray:
    """Returns dqkv (B, T, 3C)."""
    B, T, C = dout.shape
    q, k, v, hs = _split_heads(qkv, n_head)
    dout_h = dout.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)  # (B, nh, T, hs)
    datt = dout_h @ v.transpose(0, 1, 3, 2)
    dv = att.transpose(0, 1, 3, 2) @ dout_h
    # softmax backward; masked entries have att == 0 so their gradient vanishes by itself
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True))
    dscores *= 1.0 / np.sqrt(hs)
    dq = dscores @ k
    dk = dscores.transpose(0, 1, 3, 2) @ q
    merge = lambda t: t.transpose(0, 2, 1, 3).reshape(B, T, C)  # noqa: E731
    return np.concatenate([merge(dq), merge(dk), merge(dv)], axis=-1)


# ---- CUDA ------------------------------------------------------------------------------------
# The products q k^T, att v and their gradients are batched cuBLAS GEMMs (koifish_cuda.cublas_raw);
# these kernels move heads in and out of (B*nh, T, hs) and do the causal softmax.
import math  # noqa: E402

import koifish_cuda.compat  # noqa: E402,F401
from koifish_cuda.bf16 import load, store  # noqa: E402
from koifish_cuda.reduce import NEG_INF, THREADS, block_max, block_sum  # noqa: E402
from numba import cuda, float32  # noqa: E402


@cuda.jit(cache=True)
def split_heads_kernel(dst, src, col0):
    """dst (B*nh, T, hs) <- src[:, col0:col0+C] with src (B*T, W)."""
    BH, T, hs = dst.shape
    i = cuda.grid(1)
    if i < BH * T * hs:
        bh, rest = i // (T * hs), i % (T * hs)
        t, d = rest // hs, rest % hs
        nh = BH // (src.shape[0] // T)
        b, h = bh // nh, bh % nh
        store(dst, (bh, t, d), load(src, (b * T + t, col0 + h * hs + d)))


@cuda.jit(cache=True)
def merge_heads_kernel(dst, src, col0):
    """dst[:, col0:col0+C] <- src (B*nh, T, hs) with dst (B*T, W)."""
    BH, T, hs = src.shape
    i = cuda.grid(1)
    if i < BH * T * hs:
        bh, rest = i // (T * hs), i % (T * hs)
        t, d = rest // hs, rest % hs
        nh = BH // (dst.shape[0] // T)
        b, h = bh // nh, bh % nh
        store(dst, (b * T + t, col0 + h * hs + d), load(src, (bh, t, d)))


@cuda.jit(cache=True)
def softmax_causal_forward_kernel(att, scale):
    """att (BH, T, T) holds q k^T; becomes softmax(scale * scores) over keys <= query, 0 after."""
    BH, T, _ = att.shape
    buf = cuda.shared.array(THREADS, float32)
    row = cuda.blockIdx.x
    bh, t = row // T, row % T
    tid = cuda.threadIdx.x
    m = NEG_INF
    for j in range(tid, t + 1, THREADS):
        m = max(m, att[bh, t, j] * scale)
    m = block_max(m, buf)
    s = float32(0.0)
    for j in range(tid, t + 1, THREADS):
        e = math.exp(att[bh, t, j] * scale - m)
        att[bh, t, j] = e
        s += e
    inv = float32(1.0) / block_sum(s, buf)
    for j in range(tid, T, THREADS):
        att[bh, t, j] = att[bh, t, j] * inv if j <= t else 0.0


@cuda.jit(cache=True)
def softmax_causal_backward_kernel(datt, att, scale):
    """datt (BH, T, T) holds dL/d(att); becomes dL/d(q k^T) (the scale folded in)."""
    BH, T, _ = att.shape
    buf = cuda.shared.array(THREADS, float32)
    row = cuda.blockIdx.x
    bh, t = row // T, row % T
    tid = cuda.threadIdx.x
    s = float32(0.0)
    for j in range(tid, t + 1, THREADS):
        s += datt[bh, t, j] * att[bh, t, j]
    s = block_sum(s, buf)
    for j in range(tid, T, THREADS):
        datt[bh, t, j] = att[bh, t, j] * (datt[bh, t, j] - s) * scale if j <= t else 0.0


def split_heads(dst, src, col0, stream=0):
    n = dst.size
    split_heads_kernel[(n + 255) // 256, 256, stream](dst, src, col0)


def merge_heads(dst, src, col0, stream=0):
    n = src.size
    merge_heads_kernel[(n + 255) // 256, 256, stream](dst, src, col0)


def softmax_causal_forward(att, scale, stream=0):
    softmax_causal_forward_kernel[att.shape[0] * att.shape[1], THREADS, stream](att, np.float32(scale))


def softmax_causal_backward(datt, att, scale, stream=0):
    softmax_causal_backward_kernel[att.shape[0] * att.shape[1], THREADS, stream](datt, att, np.float32(scale))
