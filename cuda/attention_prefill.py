"""Causal attention of a prompt chunk on tensor cores: cuBLAS for the two products, kernels between.

q (R, nh*hd) float32, row r = b*T + t: token t of sequence b at position past + t, seeing keys
0..past+t of one layer's cache k, v (B, nkv, max_len, hd), float16 (or float32), keys of the
chunk already stored. The n_rep = nh/nkv query heads of kv head j stack into one matrix, rows
ordered (token, head), so one strided batched GEMM over the (b, j) pairs scores a tile of tokens
of every head against the keys that tile sees (L = past + its last token + 1):
    qh[b, j] (T*n_rep, hd)  = q regrouped, in the cache's dtype        (qk_norm_rope, regroup)
    S        (tq*n_rep, L)  = qh[b, j, tile] @ k[b, j, :L].T / sqrt(hd)   cuBLAS, float32 out
    P        = causal softmax of each row of S, in the cache's dtype             (causal_softmax)
    O[b, j, tile]           = P @ v[b, j, :L]                 cuBLAS, out in the cache's dtype
    att[b*T + t, h*hd + d]  = bf16(O[b, j, t, i, d]),  h = j*n_rep + i    (merge_heads)
att is the bf16 operand of the o_proj GEMM. Tiles of QUERY_TILE tokens skip most of the masked
corner (for a prompt of 4 tiles, 37.5% of the scores); inside a tile the masked part is scored and
zeroed. S and P of a tile take n_rep*tq*L values each per pair: the pairs run in groups that fit
the scratch given.
"""

from __future__ import annotations

import math

import numpy as np

import koifish_cuda.compat  # noqa: F401
from koifish_cuda.compat import nb
from koifish_cuda.bf16 import f32_to_bf16, pack_bits
from koifish_cuda.reduce import NEG_INF, THREADS, WARPS, warp_max, warp_sum
from numba import config, cuda, float32

QUERY_TILE = 512  # queries per tile: a tile's scores stop at the keys its last query sees
HELD = 64  # scores a softmax lane keeps in registers: rows of up to HELD * 32 keys are read once


def causal_softmax_ref(s, first: int, period: int, group: int) -> np.ndarray:
    """float64 P of scores s (rows, L), row rho at position first + (rho % period) // group."""
    s = np.asarray(s, np.float64)
    rows, L = s.shape
    visible = np.arange(L)[None, :] <= first + (np.arange(rows) % period // group)[:, None]
    e = np.where(visible, np.exp(s - np.where(visible, s, -np.inf).max(-1, keepdims=True)), 0.0)
    return e / e.sum(-1, keepdims=True)


@cuda.jit(device=True, inline=True)
def pair_row(b, t, h, T, n_rep, nkv):
    """Row of qh/o for token t of sequence b and query head h = j*n_rep + i: ((b*nkv + j)*T + t)*n_rep + i."""
    j = h // n_rep
    return ((b * nkv + j) * T + t) * n_rep + h - j * n_rep


@cuda.jit(cache=True)
def merge_heads_kernel(att2, o, T, n_rep):
    """att2 (B*T, nh*hd/2) uint32, two bf16 each, = o (B*nkv*T*n_rep, hd) (the cache's float type) in
    token-major layout. A thread per pair of adjacent columns (one 4-byte store); grid y walks rows."""
    R, W2 = att2.shape
    hd = o.shape[1]
    nkv = 2 * W2 // hd // n_rep
    c2 = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if c2 >= W2:
        return
    h = (2 * c2) // hd
    d = 2 * c2 - h * hd
    for r in range(cuda.blockIdx.y, R, cuda.gridDim.y):
        b = r // T
        row = pair_row(b, r - b * T, h, T, n_rep, nkv)
        lo = f32_to_bf16(float32(o[row, d]))
        hi = f32_to_bf16(float32(o[row, d + 1]))
        att2[r, c2] = pack_bits(lo, hi)


if config.ENABLE_CUDASIM:
    _exp = math.exp
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def _exp(x):
        return libdevice.fast_expf(x)


@cuda.jit(cache=True)
def causal_softmax_kernel(p, s, first, period, group):
    """p[rho] = causal softmax of s[rho] (rows, L) float32; row rho is at position
    first + (rho % period) // group and sees keys up to it; p is zero past them.

    A warp a row, WARPS rows a block: shuffles only, no block barriers (measured 1.6x the
    block-per-row kernel on one layer's 2k-token tiles). Rows of up to HELD * 32 keys are read
    once, into registers; longer ones in two passes (each lane's running max and sum, online,
    then the probabilities). exp is __expf (a few ulp: far below p's float16 rounding)."""
    tid = cuda.threadIdx.x
    lane = tid % 32
    rows, L = s.shape
    rho = cuda.blockIdx.x * WARPS + tid // 32
    live = rho < rows
    rho = min(rho, rows - 1)  # a spare warp redoes the last row and stores nothing
    n = min(L, first + (rho % period) // group + 1)
    buf = cuda.shared.array(THREADS, float32)
    if L <= HELD * 32:
        vals = cuda.local.array(HELD, float32)
        m = NEG_INF
        for u in range(HELD):
            c = u * 32 + lane
            v = s[rho, c] if c < n else NEG_INF
            vals[u] = v
            m = max(m, v)
        mx = warp_max(m, buf)
        acc = float32(0.0)
        for u in range(HELD):
            e = _exp(vals[u] - mx)  # 0 for the masked ones
            vals[u] = e
            acc += e
        inv = float32(1.0) / warp_sum(acc, buf)
        if live:
            for u in range(HELD):
                c = u * 32 + lane
                if c < L:
                    p[rho, c] = vals[u] * inv
        return
    m = NEG_INF
    acc = float32(0.0)
    for c in range(lane, n, 32):
        v = s[rho, c]
        if v > m:
            acc = acc * _exp(m - v) + float32(1.0)
            m = v
        else:
            acc += _exp(v - m)
    mx = warp_max(m, buf)
    inv = float32(1.0) / warp_sum(acc * _exp(m - mx), buf)
    if live:
        for c in range(lane, L, 32):
            p[rho, c] = _exp(s[rho, c] - mx) * inv if c < n else float32(0.0)


@cuda.jit(cache=True)
def kv_to_f16_kernel(out, codes, scales, L):
    """out[b, j, :L] (float16) = codes[b, j, :L] * scales[b, j, :L, None]: an int8 cache's keys or values
    as operands of the prefill GEMMs. 2-D grid: head dims x the (b, j, position) rows, grid-stride."""
    B, nkv, _, hd = codes.shape
    d = cuda.threadIdx.x
    if d < hd:
        for row in range(cuda.blockIdx.y, B * nkv * L, cuda.gridDim.y):
            bj = row // L
            p = row - bj * L
            b = bj // nkv
            j = bj - b * nkv
            out[b, j, p, d] = float32(codes[b, j, p, d]) * scales[b, j, p]


def kv_to_f16(out, codes, scales, L: int, stream=0):
    """Positions 0..L-1 of an int8 cache (B, nkv, max_len, hd) with scales (B, nkv, max_len) into out."""
    hd = codes.shape[3]
    rows = codes.shape[0] * codes.shape[1] * L
    grid = (1, koifish_cuda.compat.stride_blocks(rows, 8192))
    kv_to_f16_kernel[grid, max(32, hd), stream](nb(out), nb(codes), nb(scales), L)


def merge_heads(att, o, T: int, n_rep: int, stream=0):
    R, W = att.shape
    if o.shape[1] % 2:
        raise ValueError(f"merge_heads: head_dim {o.shape[1]} is odd")
    grid = ((W // 2 + 127) // 128, koifish_cuda.compat.stride_blocks(R, 256))  # a thread takes several rows
    merge_heads_kernel[grid, 128, stream](nb(att.view(np.uint32)), nb(o), T, n_rep)


def causal_softmax(p, s, first: int, period: int, group: int, stream=0):
    causal_softmax_kernel[-(-s.shape[0] // WARPS), THREADS, stream](nb(p), nb(s), first, period, group)


def regroup_ref(q, B: int, nkv: int, hd: int) -> np.ndarray:
    """q (B*T, nh*hd) -> (B*nh*T, hd) rows ordered (b, kv head, token, head of the group): the
    layout qk_norm_rope writes for the prefill (regroup=True)."""
    R, W = q.shape
    T, n_rep = R // B, W // hd // nkv
    return np.asarray(q).reshape(B, T, nkv, n_rep, hd).transpose(0, 2, 1, 3, 4).reshape(-1, hd)


def attention_prefill(att, qh, k, v, past: int, T: int, blas, o, scratch, stream=0, tile: int = QUERY_TILE):
    """att (B*T, nh*hd) uint16 bf16 = causal attention of the queries qh (B*nh*T, hd, regrouped as
    regroup_ref, in k's dtype) over one layer's k, v (B, nkv, max_len, hd) holding keys 0..past+T-1.
    blas: koifish_cuda.cublas_raw.Cublas on the stream (NumpyBlas under the simulator); o: (B*nh*T, hd)
    scratch in k's dtype (cuBLAS writes a product in its operands' type or float32); scratch: flat float32."""
    B, nkv, max_len, hd = k.shape
    nh = att.shape[1] // hd
    n_rep, pairs = nh // nkv, B * nkv
    qh3, o3 = qh.reshape(pairs, T * n_rep, hd), o.reshape(pairs, T * n_rep, hd)
    k3, v3 = k.reshape(pairs, max_len, hd), v.reshape(pairs, max_len, hd)
    for t0 in range(0, T, tile):  # query tiles: tile i scores only the keys its last query sees
        tq = min(tile, T - t0)
        rows, L = tq * n_rep, past + t0 + tq
        per = rows * L  # scores of one pair in this tile
        per_p = -(-per * k.dtype.itemsize // 4)  # floats of scratch its probabilities take
        fit = min(pairs, scratch.size // (per + per_p))
        if fit < 1:
            raise ValueError(f"attention_prefill: the scores of one kv head ({per} floats and their probabilities) "
                             f"exceed the {scratch.size}-float scratch")
        r0 = t0 * n_rep
        for i0 in range(0, pairs, fit):
            n = min(fit, pairs - i0)
            s = scratch[:n * per].reshape(n, rows, L)
            p = scratch[n * per:n * (per + per_p)].view(k.dtype)[:n * per].reshape(n, rows, L)
            blas.matmul(s, qh3[i0:i0 + n, r0:r0 + rows], k3[i0:i0 + n, :L], trans_b=True, alpha=1.0 / math.sqrt(hd))
            causal_softmax(p.reshape(n * rows, L), s.reshape(n * rows, L), past + t0, rows, n_rep, stream)
            blas.matmul(o3[i0:i0 + n, r0:r0 + rows], p, v3[i0:i0 + n, :L], trans_b=False)
    merge_heads(att, o.reshape(B * nh * T, hd), T, n_rep, stream)
