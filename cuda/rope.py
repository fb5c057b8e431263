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

import functools
import math

import numpy as np

import koifish_cuda.compat  # noqa: F401
from koifish_cuda.pdl import aware, begin
from koifish_cuda.compat import nb
from koifish_cuda.attention_prefill import pair_row
from koifish_cuda.reduce import THREADS, WARPS, sync_warp, warp_max, warp_sum
from numba import cuda, float32, float64

HD_MAX = 512  # head_dim limit (a lane holds HD_MAX / 32 values of a head)


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


@functools.lru_cache(maxsize=None)
def _kernel(HD: int):
    """The kernel for head_dim HD (a compile-time constant: a lane's HD/32 values stay in registers).

    A warp per (row, head), WARPS heads of a row per block (no division finds the item): no block
    barriers, one shuffle reduction. Every global load of an item (its head, norm weights, cos/sin,
    the v head) goes out before anything is stored: a store through a generic pointer would hold
    back the loads after it. With HD a multiple of 64 a lane's RoPE partner (d +- HD/2) is one of
    its own values; otherwise the normed head goes through shared memory. With quant (an int8
    cache) a kv head's warp quantizes its k vector, then its v vector, with their scales; else k
    and v are stored as they are (k_scale, v_scale unused)."""
    VPL = -(-HD // 32)  # values a lane holds: d = lane + 32 u
    HALF = HD // 2
    SH = HALF // 32
    IN_LANE = HALF % 32 == 0
    YB = 1 if IN_LANE else WARPS * HD

    @cuda.jit(device=True)
    def store_int8(codes, scales, b, j, p, vals, red, live):
        """codes[b, j, p], scales[b, j, p] of the warp's vector vals as quantize_kv_ref."""
        lane = cuda.threadIdx.x % 32
        m = float32(0.0)
        for u in range(VPL):
            m = max(m, abs(vals[u]))  # zero past HD
        amax = float64(warp_max(m, red))
        if live:
            if lane == 0:
                scales[b, j, p] = amax / 127.0
            for u in range(VPL):
                d = lane + 32 * u
                if d < HD:
                    codes[b, j, p, d] = round(float64(vals[u]) * 127.0 / amax) if amax > 0.0 else 0

    @aware
    @cuda.jit
    def kernel(q_out, k_cache, v_cache, k_scale, v_scale, qkv, qn, kn, cos, sin, pos, T, nh, eps, n_rep, quant, r0):
        begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
        lane = cuda.threadIdx.x % 32
        nkv = k_cache.shape[1]
        heads = nh + nkv
        y = cuda.shared.array(YB, float32)
        red = cuda.shared.array(THREADS, float32)
        x = cuda.local.array(VPL, float32)  # the head, then its normed values
        w = cuda.local.array(VPL, float32)
        c = cuda.local.array(VPL, float32)
        sn = cuda.local.array(VPL, float32)
        vv = cuda.local.array(VPL, float32)  # a kv head's v values
        out = cuda.local.array(VPL, float32)
        wp = cuda.threadIdx.x // 32
        h = cuda.blockIdx.x * WARPS + wp
        live = h < heads
        h = min(h, heads - 1)  # a spare warp computes the last head again and stores nothing
        r = r0 + cuda.blockIdx.y
        b = r // T
        t = r - b * T
        p = pos[0] + t
        is_q = h < nh
        j = h - nh
        vcol = (nh + nkv + j) * HD  # the v head of kv head j
        ss = float32(0.0)
        for u in range(VPL):
            d = lane + 32 * u
            x[u] = float32(0.0)
            vv[u] = float32(0.0)
            if d < HD:
                v = qkv[r, h * HD + d]  # q heads, then k heads: both start at h * HD in the fused row
                x[u] = v
                ss += v * v
                w[u] = qn[d] if is_q else kn[d]
                i = d if d < HALF else d - HALF
                c[u] = cos[p, i]
                sn[u] = sin[p, i]
                if not is_q:
                    vv[u] = qkv[r, vcol + d]
        rstd = float32(1.0) / math.sqrt(warp_sum(ss, red) / float32(HD) + eps)
        for u in range(VPL):
            x[u] = w[u] * (x[u] * rstd) if lane + 32 * u < HD else float32(0.0)
        if IN_LANE:
            for u in range(VPL):  # rotate-half: the partner of value u is value u +- SH of the same lane
                rot = -x[u + SH] if u < SH else x[u - SH]
                out[u] = x[u] * c[u] + rot * sn[u]
        else:
            o = wp * HD
            for u in range(VPL):
                d = lane + 32 * u
                if d < HD:
                    y[o + d] = x[u]
            sync_warp()  # the partner element is another lane's
            for u in range(VPL):
                d = lane + 32 * u
                out[u] = float32(0.0)
                if d < HD:
                    rot = -y[o + d + HALF] if d < HALF else y[o + d - HALF]
                    out[u] = x[u] * c[u] + rot * sn[u]
        if is_q:
            if live:
                row = r * nh + h if n_rep == 0 else pair_row(b, t, h, T, n_rep, nkv)  # prefill: grouped rows
                for u in range(VPL):
                    d = lane + 32 * u
                    if d < HD:
                        q_out[row, d] = out[u]
        elif not quant:
            if live:
                for u in range(VPL):
                    d = lane + 32 * u
                    if d < HD:
                        k_cache[b, j, p, d] = out[u]
                        v_cache[b, j, p, d] = vv[u]
        if quant:  # the same for the whole block: every lane reaches warp_max
            store_int8(k_cache, k_scale, b, j, p, out, red, live and not is_q)
            store_int8(v_cache, v_scale, b, j, p, vv, red, live and not is_q)

    return kernel


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
    R = qkv.shape[0]
    n_rep = nh // nkv if regroup else 0
    q_rows = q_out.reshape(-1, hd)  # a view: rows of one head's hd values
    quant = k_cache.dtype == np.int8
    if quant and (k_scale is None or v_scale is None):
        raise ValueError("qk_norm_rope: an int8 KV cache needs its k_scale and v_scale arrays")
    if not quant:
        k_scale = v_scale = _no_scales(k_cache)
    args = (nb(q_rows), nb(k_cache), nb(v_cache), nb(k_scale), nb(v_scale), nb(qkv), nb(qn), nb(kn), nb(cos),
            nb(sin), nb(pos), T, nh, np.float32(eps), n_rep, quant)
    for r0 in range(0, R, 65535):  # grid y: at most 65,535 rows a launch
        _kernel(hd)[(-(-(nh + nkv) // WARPS), min(65535, R - r0)), THREADS, stream](*args, r0)
