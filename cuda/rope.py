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
from koifish_cuda.reduce import THREADS, WARPS, sync_warp, warp_max, warp_sum
from numba import cuda, float32, float64

HD_MAX = 512  # head_dim limit (shared buffer size)
HEADS_BUF = WARPS * HD_MAX  # a block's per-warp head buffers (a shared array's size must be a constant)


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


@cuda.jit(device=True, inline=True)
def _roped(y, o, d, hd, cos, sin, p):
    """Element d of rope(y[o:o+hd]) at position p."""
    half = hd // 2
    i = d if d < half else d - half
    rot = -y[o + d + half] if d < half else y[o + d - half]
    return y[o + d] * cos[p, i] + rot * sin[p, i]


@cuda.jit(device=True, inline=True)
def _q_row(r, h, T, nh, n_rep, nkv):
    """q_out's row (of hd values) for token row r, query head h: r*nh + h, or with n_rep > 0 the
    (b, kv head)-grouped row of koifish_cuda.attention_prefill."""
    return r * nh + h if n_rep == 0 else _pair_row(r, h, T, n_rep, nkv)


@cuda.jit(device=True)
def _store_int8(codes, scales, b, j, p, z, o, red, hd, live):
    """codes[b, j, p], scales[b, j, p] of z[o:o+hd] as quantize_kv_ref, by one warp; a lane reads only
    the z[o + d] it wrote. Every lane of the block calls it (warp_max); only live warps store."""
    lane = cuda.threadIdx.x % 32
    m = float32(0.0)
    for d in range(lane, hd, 32):
        m = max(m, abs(z[o + d]))
    amax = float64(warp_max(m, red))
    if live:
        if lane == 0:
            scales[b, j, p] = amax / 127.0
        for d in range(lane, hd, 32):
            codes[b, j, p, d] = round(float64(z[o + d]) * 127.0 / amax) if amax > 0.0 else 0


@cuda.jit(cache=True)
def qk_norm_rope_kernel(q_out, k_cache, v_cache, k_scale, v_scale, qkv, qn, kn, cos, sin, pos, T, nh, eps, n_rep,
                        quant):
    """A warp per (row, head), WARPS of them per block, blocks grid-stride over the items: no block
    barriers, one shuffle reduction. With quant (an int8 cache) a kv head's warp quantizes its k
    vector, then its v vector, with their scales; else k and v are stored as they are (k_scale,
    v_scale unused)."""
    lane = cuda.threadIdx.x % 32
    wp = cuda.threadIdx.x // 32
    nkv = k_cache.shape[1]
    hd = k_cache.shape[3]
    heads = nh + nkv
    items = qkv.shape[0] * heads
    y = cuda.shared.array(HEADS_BUF, float32)  # the normed head, then
    z = cuda.shared.array(HEADS_BUF, float32)  # its roped values (read back by the int8 path)
    red = cuda.shared.array(THREADS, float32)
    o = wp * HD_MAX
    for item0 in range(cuda.blockIdx.x * WARPS, items, cuda.gridDim.x * WARPS):  # the same turns for every warp
        item = item0 + wp
        live = item < items
        item = min(item, items - 1)  # a spare warp computes the last item again and stores nothing
        r = item // heads
        h = item - r * heads
        b = r // T
        p = pos[0] + r % T
        is_q = h < nh
        j = h - nh
        w = qn if is_q else kn
        base = h * hd  # q heads, then k heads: both start at h * hd in the fused row
        ss = float32(0.0)
        for d in range(lane, hd, 32):
            v = qkv[r, base + d]
            y[o + d] = v
            ss += v * v
        rstd = float32(1.0) / math.sqrt(warp_sum(ss, red) / float32(hd) + eps)
        for d in range(lane, hd, 32):
            y[o + d] = w[d] * (y[o + d] * rstd)
        sync_warp()  # rope reads the partner element another lane wrote
        row = _q_row(r, h, T, nh, n_rep, nkv)
        for d in range(lane, hd, 32):
            z[o + d] = _roped(y, o, d, hd, cos, sin, p)
            if live and not quant:
                if is_q:
                    q_out[row, d] = z[o + d]
                else:
                    k_cache[b, j, p, d] = z[o + d]
                    v_cache[b, j, p, d] = qkv[r, (nh + nkv + j) * hd + d]
        if quant:  # the same for the whole block: every lane reaches warp_max
            kv = not is_q
            if is_q and live:
                for d in range(lane, hd, 32):
                    q_out[row, d] = z[o + d]
            _store_int8(k_cache, k_scale, b, j, p, z, o, red, hd, live and kv)
            for d in range(lane, hd, 32):
                z[o + d] = qkv[r, (nh + nkv + j) * hd + d] if kv else float32(0.0)
            _store_int8(v_cache, v_scale, b, j, p, z, o, red, hd, live and kv)
        sync_warp()  # the next turn overwrites y and z


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
    grid = koifish_cuda.compat.stride_blocks(-(-qkv.shape[0] * (nh + nkv) // WARPS), 65535)  # one turn up to 262k items
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
