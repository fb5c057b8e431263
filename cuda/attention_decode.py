"""Attention over a preallocated KV cache (grouped-query, split along the keys: flash-decoding).

q (R, nh*hd) float32, row r = b * T + t: token t of sequence b at position pos[0] + t, which sees
keys 0..pos[0]+t of k_cache[b], v_cache[b] (B, nkv, max_len, hd; float16 or float32). Decode is
T = 1 (batch 1..8); prefill runs the same kernels with T query rows per sequence.

Kernel 1: one block per (row, kv head, split). The row's visible keys are cut into `splits`
equal chunks (sized at run time from pos, so a captured graph replays at any length); the block
takes the n_rep query heads that share its kv head (each key and value is read once for all of
them), runs an online softmax over its chunk in tiles of TILE keys (one key per thread), and
writes its partial max, sum and unnormalized output. Kernel 2 merges the splits.
"""

from __future__ import annotations

import math

import numpy as np

import koifish_cuda.compat  # noqa: F401
from koifish_cuda.reduce import NEG_INF, THREADS
from numba import cuda, float32

TILE = THREADS  # keys per tile: one per thread when scoring
G_MAX = 16  # query heads per kv head
ACC = 8  # outputs per thread: n_rep * head_dim <= ACC * THREADS
QBUF = ACC * THREADS
SCBUF = G_MAX * TILE  # shared sizes must be module constants, not expressions


def attention_ref(q, k, v, past: int, B: int, nh: int):
    """float64 out (R, nh*hd) for q (R, nh*hd), k, v (B, nkv, >= past+T, hd)."""
    q = np.asarray(q, np.float64)
    R = q.shape[0]
    T = R // B
    nkv, hd = k.shape[1], k.shape[3]
    g = nh // nkv
    out = np.zeros((R, nh, hd))
    for r in range(R):
        b, t = divmod(r, T)
        L = past + t + 1
        for h in range(nh):
            kk = np.asarray(k[b, h // g, :L], np.float64)
            vv = np.asarray(v[b, h // g, :L], np.float64)
            s = kk @ q[r, h * hd:(h + 1) * hd] / math.sqrt(hd)
            p = np.exp(s - s.max())
            out[r, h] = p @ vv / p.sum()
    return out.reshape(R, nh * hd)


@cuda.jit(cache=True)
def attention_split_kernel(part_o, part_m, part_l, q, k_cache, v_cache, pos, T, n_rep, scale):
    rk = cuda.blockIdx.x
    split = cuda.blockIdx.y
    S = cuda.gridDim.y
    tid = cuda.threadIdx.x
    nkv = k_cache.shape[1]
    hd = k_cache.shape[3]
    r = rk // nkv
    kvh = rk % nkv
    b = r // T
    L = pos[0] + r % T + 1
    chunk = (L + S - 1) // S
    s0 = split * chunk
    s1 = min(L, s0 + chunk)
    GH = n_rep * hd
    h0 = kvh * n_rep
    qs = cuda.shared.array(QBUF, float32)
    sc = cuda.shared.array(SCBUF, float32)
    mrow = cuda.shared.array(G_MAX, float32)
    lrow = cuda.shared.array(G_MAX, float32)
    alpha = cuda.shared.array(G_MAX, float32)
    acc = cuda.local.array(ACC, float32)
    dots = cuda.local.array(G_MAX, float32)
    for i in range(ACC):
        acc[i] = 0.0
    for i in range(tid, GH, THREADS):
        qs[i] = q[r, h0 * hd + i] * scale
    if tid < n_rep:
        mrow[tid] = NEG_INF
        lrow[tid] = 0.0
    cuda.syncthreads()
    for base in range(s0, s1, TILE):
        n = min(TILE, s1 - base)
        # scores: thread p takes key base + p for every query head of the group
        for j in range(n_rep):
            dots[j] = 0.0
        if tid < n:
            for d in range(hd):
                kd = float32(k_cache[b, kvh, base + tid, d])
                for j in range(n_rep):
                    dots[j] += qs[j * hd + d] * kd
        for j in range(n_rep):
            sc[j * TILE + tid] = dots[j] if tid < n else NEG_INF
        cuda.syncthreads()
        if tid < n_rep:
            m_old = mrow[tid]
            mx = m_old
            for p in range(n):
                mx = max(mx, sc[tid * TILE + p])
            alpha[tid] = math.exp(m_old - mx)
            mrow[tid] = mx
        cuda.syncthreads()
        for e in range(tid, n_rep * TILE, THREADS):
            j = e // TILE
            sc[e] = math.exp(sc[e] - mrow[j]) if e % TILE < n else float32(0.0)
        cuda.syncthreads()
        if tid < n_rep:
            s = float32(0.0)
            for p in range(n):
                s += sc[tid * TILE + p]
            lrow[tid] = lrow[tid] * alpha[tid] + s
        for i in range(ACC):
            o = tid + i * THREADS
            if o < GH:
                j = o // hd
                d = o % hd
                a = acc[i] * alpha[j]
                for p in range(n):
                    a += sc[j * TILE + p] * float32(v_cache[b, kvh, base + p, d])
                acc[i] = a
        cuda.syncthreads()  # sc, alpha and lrow are rewritten by the next tile
    for i in range(ACC):
        o = tid + i * THREADS
        if o < GH:
            part_o[r, h0 + o // hd, split, o % hd] = acc[i]
    if tid < n_rep:
        part_m[r, h0 + tid, split] = mrow[tid]
        part_l[r, h0 + tid, split] = lrow[tid]


@cuda.jit(cache=True)
def attention_merge_kernel(out, part_o, part_m, part_l):
    nh = part_m.shape[1]
    S = part_m.shape[2]
    hd = part_o.shape[3]
    r = cuda.blockIdx.x // nh
    h = cuda.blockIdx.x % nh
    m = NEG_INF
    for s in range(S):
        m = max(m, part_m[r, h, s])
    den = float32(0.0)
    for s in range(S):
        den += part_l[r, h, s] * math.exp(part_m[r, h, s] - m)
    inv = float32(1.0) / den
    for d in range(cuda.threadIdx.x, hd, THREADS):
        num = float32(0.0)
        for s in range(S):
            num += part_o[r, h, s, d] * math.exp(part_m[r, h, s] - m)
        out[r, h * hd + d] = num * inv


def check_shapes(nh: int, nkv: int, hd: int) -> None:
    g = nh // nkv
    if nh % nkv or g > G_MAX or g * hd > QBUF:
        raise ValueError(f"attention kernel: {nh} query heads over {nkv} kv heads of {hd}: needs n_head a multiple "
                         f"of n_kv_head, at most {G_MAX} query heads per kv head and n_rep * head_dim <= {QBUF}")


def attention_scratch(xp, rows: int, nh: int, hd: int, splits: int):
    """(part_o, part_m, part_l) for `rows` query rows and `splits` key splits."""
    return (xp.zeros((rows, nh, splits, hd), xp.float32), xp.zeros((rows, nh, splits), xp.float32),
            xp.zeros((rows, nh, splits), xp.float32))


def attention_decode(out, q, k_cache, v_cache, pos, T: int, scratch, stream=0):
    """out (R, nh*hd) = softmax(q k^T / sqrt(hd)) v over each row's visible keys; scratch from attention_scratch
    (its split count is the number of splits used, its row count at least R)."""
    part_o, part_m, part_l = scratch
    R = q.shape[0]
    nh, splits = part_m.shape[1], part_m.shape[2]
    nkv, hd = k_cache.shape[1], k_cache.shape[3]
    check_shapes(nh, nkv, hd)
    po, pm, pl = part_o[:R], part_m[:R], part_l[:R]
    attention_split_kernel[(R * nkv, splits), THREADS, stream](po, pm, pl, q, k_cache, v_cache, pos, T, nh // nkv,
                                                               np.float32(1.0 / math.sqrt(hd)))
    attention_merge_kernel[R * nh, THREADS, stream](out, po, pm, pl)
