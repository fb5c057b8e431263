"""Qwen3's per-head q/k RMSNorm fused with RoPE, writing k and v into the KV cache.

Input: the fused projection qkv (R, (nh + 2 nkv) * hd), row r = b * T + t is token t of
sequence b at absolute position pos[0] + t (pos is a device buffer, so a captured decode graph
reads the current position at replay). Per head:
    q head h:   q_out[r, h*hd:(h+1)*hd] = rope(rmsnorm(q_h) * q_norm)
    kv head j:  k_cache[b, j, p] = rope(rmsnorm(k_j) * k_norm);   v_cache[b, j, p] = v_j
RoPE is rotate-half: out[d] = y[d] cos[p, d % (hd/2)] + rot[d] sin[...], rot = (-y[hd/2:], y[:hd/2]).
cos/sin tables (max_len, hd/2) are computed once on the host in float64.
The cache may be float16 or float32; values are rounded on store. Or int8: each stored head vector
(hd values of one sequence, kv head and position) becomes int8 codes and one float32 scale,
    scale = absmax / 127,   code = round_half_even(x * 127 / absmax)   (quantize_kv_ref)
(the kernel rounds in float64, where x * 127 is exact: its codes equal the reference's bit for bit).
"""

from __future__ import annotations

import math

import numpy as np

import koifish_cuda.compat  # noqa: F401
from koifish_cuda.compat import nb
from koifish_cuda.attention_prefill import _pair_row
from koifish_cuda.reduce import THREADS, block_max, block_sum
from numba import cuda, float32, float64

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


def quantize_kv_ref(x):
    """(int8 codes (..., hd), float32 scales (...)) of the vectors x (..., hd): one symmetric scale each."""
    x = np.asarray(x, np.float64)
    amax = np.abs(x).max(-1)
    codes = np.rint(x * 127.0 / np.where(amax > 0, amax, 1.0)[..., None])  # |x| <= amax: codes in [-127, 127]
    return codes.astype(np.int8), (amax / 127.0).astype(np.float32)


@cuda.jit(device=True)
def _norm_head(y, qkv, w, r, base, hd, eps, red):
    """y[:hd] = rmsnorm(qkv[r, base:base+hd]) * w; returns after a barrier (y visible to the block)."""
    t = cuda.threadIdx.x
    ss = float32(0.0)
    for d in range(t, hd, THREADS):
        v = qkv[r, base + d]
        y[d] = v
        ss += v * v
    total = block_sum(ss, red)  # its barriers also make y visible to every thread
    rstd = float32(1.0) / math.sqrt(total / float32(hd) + eps)
    for d in range(t, hd, THREADS):
        y[d] = w[d] * (y[d] * rstd)
    cuda.syncthreads()


@cuda.jit(device=True, inline=True)
def _roped(y, d, hd, cos, sin, p):
    half = hd // 2
    i = d if d < half else d - half
    rot = -y[d + half] if d < half else y[d - half]
    return y[d] * cos[p, i] + rot * sin[p, i]


@cuda.jit(device=True, inline=True)
def _q_row(r, h, T, nh, n_rep, nkv):
    """q_out's row (of hd values) for token row r, query head h: r*nh + h, or with n_rep > 0 the
    (b, kv head)-grouped row of koifish_cuda.attention_prefill."""
    return r * nh + h if n_rep == 0 else _pair_row(r, h, T, n_rep, nkv)


@cuda.jit(device=True)
def _store_int8(codes, scales, b, j, p, z, red, hd):
    """codes[b, j, p], scales[b, j, p] of z[:hd] as quantize_kv_ref; a thread reads only the z[d] it wrote."""
    t = cuda.threadIdx.x
    m = float32(0.0)
    for d in range(t, hd, THREADS):
        m = max(m, abs(z[d]))
    amax = float64(block_max(m, red))
    if t == 0:
        scales[b, j, p] = amax / 127.0
    for d in range(t, hd, THREADS):
        codes[b, j, p, d] = round(float64(z[d]) * 127.0 / amax) if amax > 0.0 else 0


@cuda.jit(cache=True)
def qk_norm_rope_kernel(q_out, k_cache, v_cache, k_scale, v_scale, qkv, qn, kn, cos, sin, pos, T, nh, eps, n_rep,
                        quant):
    """A block per (row, head). With quant (an int8 cache) a kv head's block quantizes its k vector,
    then its v vector, with their scales; else k and v are stored as they are (k_scale, v_scale unused)."""
    r = cuda.blockIdx.x
    h = cuda.blockIdx.y
    t = cuda.threadIdx.x
    nkv = k_cache.shape[1]
    hd = k_cache.shape[3]
    b = r // T
    p = pos[0] + r % T
    y = cuda.shared.array(HD_MAX, float32)
    z = cuda.shared.array(HD_MAX, float32)
    red = cuda.shared.array(THREADS, float32)
    is_q = h < nh
    j = h - nh
    # q heads, then k heads: both start at h * hd in the fused row
    _norm_head(y, qkv, qn if is_q else kn, r, h * hd, hd, eps, red)
    row = _q_row(r, h, T, nh, n_rep, nkv)
    for d in range(t, hd, THREADS):
        val = _roped(y, d, hd, cos, sin, p)
        if is_q:
            q_out[row, d] = val
        elif quant:
            z[d] = val
        else:
            k_cache[b, j, p, d] = val
            v_cache[b, j, p, d] = qkv[r, (nh + nkv + j) * hd + d]
    if quant and not is_q:  # the same for the whole block: every thread reaches block_max's barriers
        _store_int8(k_cache, k_scale, b, j, p, z, red, hd)
        for d in range(t, hd, THREADS):
            z[d] = qkv[r, (nh + nkv + j) * hd + d]
        _store_int8(v_cache, v_scale, b, j, p, z, red, hd)


_NO_SCALES: dict = {}  # a placeholder scales array per array module, for float caches


def _no_scales(like):
    xp = type(like).__module__.split(".")[0]
    if xp not in _NO_SCALES:
        mod = __import__(xp)
        _NO_SCALES[xp] = mod.zeros((1, 1, 1), np.float32)
    return _NO_SCALES[xp]


def qk_norm_rope(q_out, k_cache, v_cache, qkv, qn, kn, cos, sin, pos, T: int, nh: int, eps: float, stream=0,
                 k_scale=None, v_scale=None, regroup: bool = False):
    """qkv (B*T, (nh+2nkv)*hd) -> q_out (B*T, nh*hd); k, v into the caches (B, nkv, max_len, hd) at pos[0]+t.
    An int8 cache takes its scales (B, nkv, max_len) float32 in k_scale, v_scale. With regroup, q_out is
    (B*nh*T, hd) in the prefill attention's (b, kv head)-grouped row order (any float dtype)."""
    hd = k_cache.shape[3]
    if hd > HD_MAX or hd % 2:
        raise ValueError(f"head_dim {hd}: the kernel takes even head_dim up to {HD_MAX}")
    nkv = k_cache.shape[1]
    grid = (qkv.shape[0], nh + nkv)
    n_rep = nh // nkv if regroup else 0
    q_rows = q_out.reshape(-1, hd)  # a view: rows of one head's hd values
    quant = k_cache.dtype == np.int8
    if quant and (k_scale is None or v_scale is None):
        raise ValueError("qk_norm_rope: an int8 KV cache needs its k_scale and v_scale arrays")
    if not quant:
        k_scale = v_scale = _no_scales(k_cache)
    qk_norm_rope_kernel[grid, THREADS, stream](nb(q_rows), nb(k_cache), nb(v_cache), nb(k_scale), nb(v_scale),
                                              nb(qkv), nb(qn), nb(kn), nb(cos), nb(sin), nb(pos), T, nh,
                                              np.float32(eps), n_rep, quant)
