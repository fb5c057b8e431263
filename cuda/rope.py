"""Qwen3's per-head q/k RMSNorm fused with RoPE, writing k and v into the KV cache.

Input: the fused projection qkv (R, (nh + 2 nkv) * hd), row r = b * T + t is token t of
sequence b at absolute position pos[0] + t (pos is a device buffer, so a captured decode graph
reads the current position at replay). Per head:
    q head h:   q_out[r, h*hd:(h+1)*hd] = rope(rmsnorm(q_h) * q_norm)
    kv head j:  k_cache[b, j, p] = rope(rmsnorm(k_j) * k_norm);   v_cache[b, j, p] = v_j
RoPE is rotate-half: out[d] = y[d] cos[p, d % (hd/2)] + rot[d] sin[...], rot = (-y[hd/2:], y[:hd/2]).
cos/sin tables (max_len, hd/2) are computed once on the host in float64.
The cache may be float16 or float32; values are rounded on store.
"""

from __future__ import annotations

import math

import numpy as np

import koifish_cuda.compat  # noqa: F401
from koifish_cuda.reduce import THREADS, block_sum
from numba import cuda, float32

HD_MAX = 512  # head_dim limit (shared buffer size)


def rope_tables(max_len: int, head_dim: int, theta: float):
    """(cos, sin) float32 (max_len, hd/2), angles in float64 as the CPU reference computes them."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ang = np.arange(max_len, dtype=np.float64)[:, None] * inv_freq
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def qk_norm_rope_ref(qkv, qn, kn, cos, sin, past: int, B: int, nh: int, nkv: int, hd: int, eps: float):
    """float64 (q (R, nh*hd), k (B, nkv, T, hd), v (B, nkv, T, hd)) for rows R = B*T at positions past.."""
    qkv = np.asarray(qkv, np.float64)
    R = qkv.shape[0]
    T = R // B
    heads = qkv.reshape(R, nh + 2 * nkv, hd)

    def norm(x, w):
        return np.asarray(w, np.float64) * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)

    p = past + np.arange(R) % T
    c = np.concatenate([cos[p], cos[p]], -1).astype(np.float64)[:, None]
    s = np.concatenate([sin[p], sin[p]], -1).astype(np.float64)[:, None]

    def rope(y):
        h = hd // 2
        return y * c + np.concatenate([-y[..., h:], y[..., :h]], -1) * s

    q = rope(norm(heads[:, :nh], qn)).reshape(R, nh * hd)
    k = rope(norm(heads[:, nh:nh + nkv], kn)).reshape(B, T, nkv, hd).transpose(0, 2, 1, 3)
    v = heads[:, nh + nkv:].reshape(B, T, nkv, hd).transpose(0, 2, 1, 3)
    return q, k, v


@cuda.jit(cache=True)
def qk_norm_rope_kernel(q_out, k_cache, v_cache, qkv, qn, kn, cos, sin, pos, T, nh, eps):
    r = cuda.blockIdx.x
    h = cuda.blockIdx.y
    t = cuda.threadIdx.x
    nkv = k_cache.shape[1]
    hd = k_cache.shape[3]
    half = hd // 2
    b = r // T
    p = pos[0] + r % T
    y = cuda.shared.array(HD_MAX, float32)
    red = cuda.shared.array(THREADS, float32)
    is_q = h < nh
    base = h * hd  # q heads, then k heads: both start at h * hd in the fused row
    ss = float32(0.0)
    for d in range(t, hd, THREADS):
        v = qkv[r, base + d]
        y[d] = v
        ss += v * v
    total = block_sum(ss, red)  # its barriers also make y visible to every thread
    rstd = float32(1.0) / math.sqrt(total / float32(hd) + eps)
    for d in range(t, hd, THREADS):
        w = qn[d] if is_q else kn[d]
        y[d] = w * (y[d] * rstd)
    cuda.syncthreads()
    for d in range(t, hd, THREADS):
        i = d if d < half else d - half
        rot = -y[d + half] if d < half else y[d - half]
        val = y[d] * cos[p, i] + rot * sin[p, i]
        if is_q:
            q_out[r, base + d] = val
        else:
            j = h - nh
            k_cache[b, j, p, d] = val
            v_cache[b, j, p, d] = qkv[r, (nh + nkv + j) * hd + d]


def qk_norm_rope(q_out, k_cache, v_cache, qkv, qn, kn, cos, sin, pos, T: int, nh: int, eps: float, stream=0):
    """qkv (B*T, (nh+2nkv)*hd) -> q_out (B*T, nh*hd); k, v into the caches (B, nkv, max_len, hd) at pos[0]+t."""
    hd = k_cache.shape[3]
    if hd > HD_MAX or hd % 2:
        raise ValueError(f"head_dim {hd}: the kernel takes even head_dim up to {HD_MAX}")
    nkv = k_cache.shape[1]
    qk_norm_rope_kernel[(qkv.shape[0], nh + nkv), THREADS, stream](q_out, k_cache, v_cache, qkv, qn, kn, cos, sin,
                                                                  pos, T, nh, np.float32(eps))
