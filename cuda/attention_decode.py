"""Attention over a preallocated KV cache (grouped-query, split along the keys: flash-decoding).

q (R, nh*hd) float32, row r = b * T + t: token t of sequence b at position pos[0] + t, which sees
keys 0..pos[0]+t of k_cache[b], v_cache[b] (B, nkv, max_len, hd; float16 or float32). Decode is
T = 1 (batch 1..8); prefill runs the same kernels with T query rows per sequence.
An int8 cache (koifish_cuda.rope: codes and one float32 scale per head vector, k_scale and v_scale
(B, nkv, max_len)) is read by a variant compiled apart: the tile's codes load as they are (exact in
float32) and its 2 x TILE scales beside them; a key's scale multiplies its score once, a value's
scale its softmax weight once (into a second weight buffer: the row sums take the bare weights).

Kernel 1: one block per (row, kv head, split). The row's visible keys are cut into `splits`
equal chunks (sized at run time from pos, so a captured graph replays at any length); the block
takes the n_rep query heads that share its kv head (each key and value is read once for all of
them) and runs an online softmax over its chunk in tiles of TILE keys: the tile's K and V are
loaded whole into shared memory (coalesced, every load of a thread issued before the first is
used), a warp scores one query head against the tile's keys (a key per lane: TILE is the warp
size) and updates that head's running max and sum with shuffles (three barriers a tile), and each
thread accumulates one output dimension of its query heads. It writes its partial max, sum and
unnormalized output. Kernel 2 merges the splits (their weights in shared memory, the partial
outputs read four at a time).
Kernel 1 comes in three variants (attention_decode's `variant`): the tile kernel above (int8 caches),
"warps" (a warp walks its own keys, a lane owning head_dim/32 dimensions) and "mma" (the default for
float16 caches: a 16-key tile's scores and its weighted sum of V as tensor-core products,
_split_mma_kernel), which can also do qk_norm_rope's work for a decode step (rope=).
Shapes are compile-time constants of the split kernel (one compiled per head_dim, n_rep, int8 or not).
"""

from __future__ import annotations

import functools
import math

import numpy as np

import koifish_cuda.compat  # noqa: F401
from koifish_cuda.pdl import aware, begin
from koifish_cuda.quant_a8 import CHUNK, store_rounded
from koifish_cuda.mma import mma_f16, pack_f16x2, unpack_f16x2
from koifish_cuda.prefetch import lines_or_none, no_prefetch, prefetch_blocks, prefetch_share
from koifish_cuda.reduce import (NEG_INF, THREADS, WARPS, block_reduce_warps, shfl_xor, sync_warp, warp_max,
                                 warp_sum)
from koifish_cuda.vload import aligned, load2, load4
from numba import config, cuda, float32, uint32

TILE = 32  # keys per tile, a lane's each (its K and V, fp32 in shared memory: 32.5 KB at head_dim 128)
G_MAX = 16  # query heads per kv head
HD_MAX = THREADS  # head_dim divides THREADS (a thread owns one dimension of the output)


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


def dequantize_kv_ref(codes, scales):
    """float64 vectors (..., hd) of an int8 cache: codes (..., hd) times their scales (...)."""
    return np.asarray(codes, np.float64) * np.asarray(scales, np.float64)[..., None]


@cuda.jit(device=True, inline=True)
def _load(ks, vs, k_cache, v_cache, b, kvh, base, key, d, n, KP, HD):
    kv = float32(0.0)
    vv = float32(0.0)
    if key < n:
        kv = float32(k_cache[b, kvh, base + key, d])
        vv = float32(v_cache[b, kvh, base + key, d])
    ks[key * KP + d] = kv
    vs[key * HD + d] = vv


@cuda.jit(device=True, inline=True)
def _chunk_keys(L, S, min_chunk):
    """Keys a split takes of L over S splits, at least min_chunk: what the split kernels and the merge share."""
    return max((L + S - 1) // S, min_chunk)


@cuda.jit(device=True, inline=True)
def _split_keys(k_cache, pos, T, NREP, MIN_CHUNK=1, S=0):
    """The block's work: (row r, its kv head, sequence b, visible keys L, this split's keys s0..s1, the
    first of the kv head's NREP query heads). The splits cut the row's keys into equal chunks sized at
    run time from pos, so a captured graph replays at any length; a chunk holds at least MIN_CHUNK keys
    (the splits past the keys stay empty). S: the split count when the grid's y holds more blocks than
    splits (0: gridDim.y)."""
    nkv = k_cache.shape[1]
    r = cuda.blockIdx.x // nkv
    kvh = cuda.blockIdx.x % nkv
    L = pos[0] + r % T + 1
    chunk = _chunk_keys(L, cuda.gridDim.y if S == 0 else S, MIN_CHUNK)
    s0 = cuda.blockIdx.y * chunk
    return r, kvh, r // T, L, s0, min(L, s0 + chunk), kvh * NREP


@functools.lru_cache(maxsize=None)
def _split_kernel(HD: int, NREP: int, QUANT: bool = False):
    """The split kernel for head_dim HD and NREP query heads per kv head (compile-time constants:
    shared sizes, and loops the compiler unrolls: a tile's loads are all in flight at once).
    QUANT: an int8 cache, its scales in the `scales` argument (k_scale, v_scale); else scales is ()
    (no kernel parameter) and the `if QUANT` blocks are pruned before typing: the float kernels as before."""
    KP = HD + 1  # padded K rows: the threads of a warp score different keys without bank conflicts
    KBUF, VBUF, QB, SB = TILE * KP, TILE * HD, NREP * HD, NREP * TILE
    KROWS = TILE // (THREADS // HD)  # tile rows a thread loads (column d_own of rows k_own, k_own + HSTEP, ...)
    PAIRS = -(-NREP // WARPS)  # turns of the block's warps over the query heads
    HSTEP = THREADS // HD  # query heads a pass of the threads accumulates (HD divides THREADS)
    NACC = -(-NREP // HSTEP)
    SCB = TILE if QUANT else 1

    @aware
    @cuda.jit
    def kernel(part_o, part_m, part_l, q, k_cache, v_cache, scales, pos, T, scale):
        begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
        split = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        r, kvh, b, L, s0, s1, h0 = _split_keys(k_cache, pos, T, NREP)
        qs = cuda.shared.array(QB, float32)
        ks = cuda.shared.array(KBUF, float32)
        vs = cuda.shared.array(VBUF, float32)
        sc = cuda.shared.array(SB, float32)
        if QUANT:
            ksc = cuda.shared.array(SCB, float32)  # the tile's key scales
            vsc = cuda.shared.array(SCB, float32)  # and value scales
            sw = cuda.shared.array(SB, float32)  # softmax weights times the value scales
        else:
            sw = sc
        mrow = cuda.shared.array(NREP, float32)
        lrow = cuda.shared.array(NREP, float32)
        alpha = cuda.shared.array(NREP, float32)
        acc = cuda.local.array(NACC, float32)
        for i in range(NACC):
            acc[i] = 0.0
        for i in range(tid, QB, THREADS):
            qs[i] = q[r, h0 * HD + i] * scale
        if tid < NREP:
            mrow[tid] = NEG_INF
            lrow[tid] = 0.0
        lane = tid % 32
        wp = tid // 32
        red = cuda.shared.array(THREADS, float32)  # the simulator's warp reductions (unused on a GPU)
        d_own = tid % HD
        j_own = tid // HD
        k_own = tid // HD
        for base in range(s0, s1, TILE):
            n = min(TILE, s1 - base)
            cuda.syncthreads()  # the previous tile's readers are done (and qs is in place)
            for u in range(0, KROWS, 4):  # the tile's keys and values, fp16 -> fp32, coalesced: 8 loads in flight
                _load(ks, vs, k_cache, v_cache, b, kvh, base, k_own + u * HSTEP, d_own, n, KP, HD)
                _load(ks, vs, k_cache, v_cache, b, kvh, base, k_own + (u + 1) * HSTEP, d_own, n, KP, HD)
                _load(ks, vs, k_cache, v_cache, b, kvh, base, k_own + (u + 2) * HSTEP, d_own, n, KP, HD)
                _load(ks, vs, k_cache, v_cache, b, kvh, base, k_own + (u + 3) * HSTEP, d_own, n, KP, HD)
            if QUANT:
                if tid < TILE:
                    ksc[tid] = scales[0][b, kvh, base + tid] if tid < n else float32(0.0)
                elif tid < 2 * TILE:
                    vsc[tid - TILE] = scales[1][b, kvh, base + tid - TILE] if tid - TILE < n else float32(0.0)
            cuda.syncthreads()
            for u in range(PAIRS):  # a warp takes one query head, a lane one key: score, then the online softmax
                j = u * WARPS + wp  # the same for the whole warp; a warp past the heads works on a copy, stores nothing
                jj = min(j, NREP - 1)
                m_old = mrow[jj]
                sv = NEG_INF
                if lane < n:
                    a0 = float32(0.0)  # four partial sums: four short dependency chains instead of one long one
                    a1 = float32(0.0)
                    a2 = float32(0.0)
                    a3 = float32(0.0)
                    for d in range(0, HD, 4):
                        a0 += qs[jj * HD + d] * ks[lane * KP + d]
                        a1 += qs[jj * HD + d + 1] * ks[lane * KP + d + 1]
                        a2 += qs[jj * HD + d + 2] * ks[lane * KP + d + 2]
                        a3 += qs[jj * HD + d + 3] * ks[lane * KP + d + 3]
                    sv = (a0 + a1) + (a2 + a3)
                    if QUANT:
                        sv *= ksc[lane]
                mx = warp_max(max(sv, m_old), red)  # m_old is in a register before any lane stores the new one
                e = math.exp(sv - mx) if lane < n else float32(0.0)
                total = warp_sum(e, red)
                if j < NREP:
                    sc[j * TILE + lane] = e
                    if QUANT:
                        sw[j * TILE + lane] = e * vsc[lane]
                    if lane == 0:
                        al = math.exp(m_old - mx)
                        alpha[j] = al
                        mrow[j] = mx
                        lrow[j] = lrow[j] * al + total
            cuda.syncthreads()  # the weights and alphas are in place for every thread
            for i in range(NACC):  # thread: dimension d_own of query heads j_own, j_own + HSTEP, ...
                j = j_own + i * HSTEP
                if j < NREP:
                    a = acc[i] * alpha[j]
                    for key in range(TILE):
                        a += sw[j * TILE + key] * vs[key * HD + d_own]
                    acc[i] = a
        for i in range(NACC):
            j = j_own + i * HSTEP
            if j < NREP:
                part_o[r, h0 + j, split, d_own] = acc[i]
        if tid < NREP:
            part_m[r, h0 + tid, split] = mrow[tid]
            part_l[r, h0 + tid, split] = lrow[tid]

    return kernel


@cuda.jit(device=True, inline=True)
def _load_dims(cache, b, kvh, key, d0, out, o, DPL):
    """out[o : o + DPL] = cache[b, kvh, key, d0 : d0 + DPL] as float32 (one 8- or 16-byte load when DPL is 4)."""
    if DPL == 4:
        h0, h1, h2, h3 = load4(cache, (b, kvh, key, d0))
        out[o], out[o + 1], out[o + 2], out[o + 3] = float32(h0), float32(h1), float32(h2), float32(h3)
    else:
        for e in range(DPL):
            out[o + e] = float32(cache[b, kvh, key, d0 + e])


@functools.lru_cache(maxsize=None)
def _split_warps_kernel(HD: int, NREP: int):
    """The "warps" split kernel (float caches, HD a multiple of 32): each warp walks its own keys (key
    base + w of every WARPS), lane l owning dimensions l * DPL .. + DPL of the K and V rows (one 8-byte
    load each at HD 128 in float16): the NREP heads' scores by warp shuffles, each head's online softmax
    in registers, no barrier until the block's four warps merge their states at the end. 3x the tile
    kernel's speed at 8k keys (its 2-byte loads into shared memory and three barriers a tile left it
    at 7% of copy; this one 22%), the next key's loads issued before this key's arithmetic. It is
    bound by instructions: ~470 a key a warp (a warp sum, two exps and a rescale a head a key), so a
    ring of 2-4 keys in flight, more splits or a branch-free update measured no faster (stop 16); the
    "mma" kernel below is 2-3x faster where it applies."""
    DPL = HD // 32
    QR = NREP * DPL  # sizes must be plain constants
    KG = 2 * DPL  # this key's slot and the next one's
    WM = WARPS * NREP
    WO = WARPS * NREP * HD

    @aware
    @cuda.jit
    def kernel(part_o, part_m, part_l, q, k_cache, v_cache, scales, pos, T, scale):
        begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
        split = cuda.blockIdx.y
        wp = cuda.threadIdx.x // 32
        r, kvh, b, L, s0, s1, h0 = _split_keys(k_cache, pos, T, NREP)
        d0 = (cuda.threadIdx.x % 32) * DPL
        red = cuda.shared.array(THREADS, float32)  # the simulator's warp reductions (unused on a GPU)
        qr = cuda.local.array(QR, float32)
        acc = cuda.local.array(QR, float32)
        m = cuda.local.array(NREP, float32)
        lsum = cuda.local.array(NREP, float32)
        kg = cuda.local.array(KG, float32)
        vg = cuda.local.array(KG, float32)
        _start_heads(q, r, h0, d0, scale, qr, acc, m, lsum, NREP, HD, DPL)
        safe = min(s0, L - 1)  # a key inside the cache (an empty split's s0 may lie past it)
        # every warp takes the same turns (the simulator's warp sums are block-wide); a key past the
        # split loads a real row and its weight is dropped
        first = s0 + wp if s0 + wp < s1 else safe
        _load_dims(k_cache, b, kvh, first, d0, kg, DPL, DPL)
        _load_dims(v_cache, b, kvh, first, d0, vg, DPL, DPL)
        for base in range(s0, s1, WARPS):
            key = base + wp
            for e in range(DPL):  # the next slot becomes this one's
                kg[e] = kg[DPL + e]
                vg[e] = vg[DPL + e]
            nxt = key + WARPS if key + WARPS < s1 else safe
            _load_dims(k_cache, b, kvh, nxt, d0, kg, DPL, DPL)
            _load_dims(v_cache, b, kvh, nxt, d0, vg, DPL, DPL)
            _online_update(qr, kg, vg, 0, m, lsum, acc, key < s1, red, NREP, DPL)
        wm = cuda.shared.array(WM, float32)
        wl = cuda.shared.array(WM, float32)
        wo = cuda.shared.array(WO, float32)
        _combine_warps(part_o, part_m, part_l, r, h0, split, m, lsum, acc, wm, wl, wo, NREP, HD, DPL)

    return kernel


MMA_TILE = 16  # keys a warp of the mma kernel takes at once: the rows of one product (32: 248 registers, 53 KB shared)
# keys a split of the mma kernel takes at least: at 1k keys 16 splits of 64 beat 32 of 32 (11.9 against 15.1 us),
# at 8k 32 splits beat 16 (25.8 against 30.7)
MMA_MIN_CHUNK = 64


@functools.lru_cache(maxsize=None)
def _split_mma_kernel(HD: int, NREP: int, ROPE: bool = False):
    """The "mma" split kernel (float16 caches, HD a multiple of 64, NREP at most 8): each warp takes
    tiles of MMA_TILE (16) keys and scores them against the kv head's NREP query heads on the tensor cores,
    S^T (keys x 8 heads) = K (keys x HD) Q^T, as mma.sync m16n8k16 products (koifish_cuda.mma): lane
    (g, c) = (lane // 4, lane % 4) holds a quarter of key rows g and g + 8 of each 16-key tile (the
    dimensions c HD/4 .. + HD/4, 16-byte loads; a product is invariant under a permutation of the
    dimensions shared by K and q, so the fragments take the row as it lies in memory) and head g's
    query at the same dimensions, rounded to float16 twice (hi + lo: the product keeps float32's
    precision). A lane gets the scores of heads 2c, 2c + 1 at two keys: the tile's max per head is
    three shuffles, one exp a score, one rescale of the output a tile (the "warps" kernel spends a
    warp sum a key a head, and two exps in each of 32 lanes). The weighted sum of V is a tensor-core
    product too, O^T (HD x 8 heads) += V^T P^T (_weighted_v_mma): the tile's V rows, loaded with its K
    rows (all of a tile's bytes in flight at once: 8 KB a warp), and its weights go through shared
    memory. k_cache and v_cache come as uint32 views (two float16 a word).
    ROPE (decode, one row per sequence): q is the fused projection's row (koifish_cuda.rope's qkv) and
    `scales` (qn, kn, cos, sin, eps): the kernel runs qk_norm_rope's work itself, saving its node: each
    block norms and rotates its query heads from the raw row (a lane's quarter of a head: the sum of
    squares over the four lanes of a g, the RoPE partner d +- HD/2 in lane c ^ 2), and the block whose
    split holds the new key stores that key (normed, rotated) and value into the caches before its
    first tile reads them."""
    KS = HD // 16  # k-steps of 16 dimensions
    KW = HD // 8  # uint32 words of a key row a lane holds (a quarter of the row)
    DPL = HD // 32
    VW = DPL // 2  # words of a V row a lane loads
    QB = 2 * KS
    QW = HD // 4 if ROPE else 1
    MT = MMA_TILE // 16  # the product's row tiles
    KR = 4 * MT * KW // 2
    NS = 4 * MT  # a lane's scores a tile
    RS = HD // 2 + 4  # words a V row takes in shared memory (padded: the product's loads are conflict-free)
    VS = WARPS * MMA_TILE * RS
    MV = HD // 16  # the weighted sum's 16-dimension slices of V
    QR = 4 * MV
    WM = WARPS * NREP
    WO = WARPS * NREP * HD
    PR = MMA_TILE + 4  # a head's row of tile weights, [head][key] (padded)
    PS = WARPS * 8 * PR
    SIM = config.ENABLE_CUDASIM  # the simulator's mma and shuffles are block-wide: every warp takes every turn
    # two blocks an SM (32 splits x 8 kv heads are 256 blocks): ptxas 253 registers, no spills; at three, 168
    # and 232 bytes spilled: 20.1 against 25.2 us at 8k keys (H200, bench_qwen3_kernels.py, stop 18)
    bounds = {} if SIM else {"launch_bounds": (THREADS, 2)}

    @aware
    @cuda.jit(**bounds)
    def kernel(part_o, part_m, part_l, q, k_cache, v_cache, scales, pos, T, scale, pf):
        begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
        split = cuda.blockIdx.y
        S = part_m.shape[2]
        if split >= S:  # a spare row of blocks: pf (the o projection's weights) into L2, while the splits run
            prefetch_share(pf, (split - S) * cuda.gridDim.x + cuda.blockIdx.x, (cuda.gridDim.y - S) * cuda.gridDim.x)
            return
        lane = cuda.threadIdx.x % 32
        wp = cuda.threadIdx.x // 32
        g = lane // 4
        c = lane % 4
        r, kvh, b, L, s0, s1, h0 = _split_keys(k_cache, pos, T, NREP, MMA_MIN_CHUNK, S)
        if s0 >= L:  # a split past the keys (the merge reads none of its partials)
            return
        red = cuda.shared.array(THREADS, float32)  # the simulator's shuffles (unused on a GPU)
        xr = cuda.local.array(QW, float32)  # ROPE: the lane's quarter of head g's query, normed and rotated
        if ROPE:
            nh = part_m.shape[1]
            if s1 == L:  # the new key's block: stored before any tile of it loads the row
                _store_new_kv(k_cache, v_cache, q, scales, r, b, kvh, nh, L - 1, red, HD, DPL)
                cuda.syncthreads()
            _rope_query(xr, q, scales, r, h0 + min(g, NREP - 1), c, L - 1, red, HD)
        mbuf = cuda.shared.array((THREADS, 6), uint32)  # the simulator's mma (unused on a GPU)
        ps = cuda.shared.array(PS, float32)  # each warp's tile weights, [head][key]
        qh = cuda.local.array(QB, uint32)
        ql = cuda.local.array(QB, uint32)
        kw = cuda.local.array(KR, uint32)
        vsh = cuda.shared.array(VS, uint32)  # each warp's tile of V rows
        sc = cuda.local.array(NS, float32)
        acc = cuda.local.array(QR, float32)  # heads 2c, 2c + 1 at dimensions 16 mt + 2g, + 1 (_weighted_v_mma)
        for s in range(KS):  # head g's query (zero past NREP) at dims c HD/4 + 4s .. + 4: b0, b1 of step s
            x0 = x1 = x2 = x3 = float32(0.0)
            if ROPE and g < NREP:
                x0, x1, x2, x3 = xr[4 * s], xr[4 * s + 1], xr[4 * s + 2], xr[4 * s + 3]
            elif g < NREP:
                x0, x1, x2, x3 = load4(q, (r, (h0 + g) * HD + c * (HD // 4) + 4 * s))
            qh[2 * s], ql[2 * s] = _hi_lo(x0 * scale, x1 * scale)
            qh[2 * s + 1], ql[2 * s + 1] = _hi_lo(x2 * scale, x3 * scale)
        for i in range(QR):
            acc[i] = float32(0.0)
        m0 = m1 = NEG_INF  # heads 2c and 2c + 1: running max (the same in the lanes of a c)
        l0 = l1 = float32(0.0)  # and this lane's keys' share of the running sum
        safe = min(s0, L - 1)  # a key past the split loads a real row, its weight 0
        for base in range(s0, s1, WARPS * MMA_TILE):
            kb = base + wp * MMA_TILE
            if kb < s1 or SIM:
                for t in range(2 * MT):  # key rows kb + 16 (t // 2) + 8 (t % 2) + g, the lane's quarter
                    key = kb + 8 * t + g
                    row = key if key < s1 else safe
                    for i in range(0, KW, 4):
                        kw[t * KW + i], kw[t * KW + i + 1], kw[t * KW + i + 2], kw[t * KW + i + 3] = load4(
                            k_cache, (b, kvh, row, c * KW + i))
                for k in range(MMA_TILE):  # the tile's V rows, the lane's DPL dimensions, into shared memory
                    row = kb + k if kb + k < s1 else safe  # (registers indexed by the key would go to local memory)
                    o = (wp * MMA_TILE + k) * RS + lane * VW
                    if VW == 2:
                        vsh[o], vsh[o + 1] = load2(v_cache, (b, kvh, row, 2 * lane))
                    else:
                        for i in range(VW):
                            vsh[o + i] = v_cache[b, kvh, row, lane * VW + i]
                for mt in range(MT):
                    d0 = d1 = d2 = d3 = float32(0.0)  # q's hi part; e: its lo part (two chains of KS, not one of 2 KS)
                    e0 = e1 = e2 = e3 = float32(0.0)
                    for s in range(KS):
                        ra = 2 * mt * KW + 2 * s  # row g of the 16-key tile, then row g + 8
                        rb = ra + KW
                        d0, d1, d2, d3 = mma_f16(kw[ra], kw[rb], kw[ra + 1], kw[rb + 1], qh[2 * s], qh[2 * s + 1],
                                                 d0, d1, d2, d3, mbuf)
                        e0, e1, e2, e3 = mma_f16(kw[ra], kw[rb], kw[ra + 1], kw[rb + 1], ql[2 * s], ql[2 * s + 1],
                                                 e0, e1, e2, e3, mbuf)
                    sc[4 * mt], sc[4 * mt + 1], sc[4 * mt + 2], sc[4 * mt + 3] = d0 + e0, d1 + e1, d2 + e2, d3 + e3
                t0 = t1 = NEG_INF
                for i in range(NS):  # sc[i]: key kb + 8 (i // 2) + g, head 2c + i % 2
                    if kb + 8 * (i // 2) + g >= s1:
                        sc[i] = NEG_INF
                    if i % 2 == 0:
                        t0 = max(t0, sc[i])
                    else:
                        t1 = max(t1, sc[i])
                for off in (4, 8, 16):  # over the lanes of the same c
                    t0 = max(t0, shfl_xor(t0, off, red))
                    t1 = max(t1, shfl_xor(t1, off, red))
                n0 = max(m0, t0)
                n1 = max(m1, t1)
                a0 = math.exp(m0 - n0)
                a1 = math.exp(m1 - n1)
                l0 *= a0
                l1 *= a1
                m0 = n0
                m1 = n1
                pw = wp * 8 * PR
                for i in range(NS):
                    key = 8 * (i // 2) + g
                    p = math.exp(sc[i] - (n0 if i % 2 == 0 else n1)) if kb + key < s1 else float32(0.0)
                    if i % 2 == 0:
                        l0 += p
                    else:
                        l1 += p
                    ps[pw + (2 * c + i % 2) * PR + key] = p
                _weighted_v_mma(acc, vsh, ps, pw, wp * MMA_TILE * RS, a0, a1, g, c, mbuf, MV, RS, PR)
        for off in (4, 8, 16):
            l0 += shfl_xor(l0, off, red)
            l1 += shfl_xor(l1, off, red)
        wm = cuda.shared.array(WM, float32)
        wl = cuda.shared.array(WM, float32)
        wo = cuda.shared.array(WO, float32)
        if g == 0 and 2 * c < NREP:
            wm[wp * NREP + 2 * c] = m0
            wl[wp * NREP + 2 * c] = l0
        if g == 0 and 2 * c + 1 < NREP:
            wm[wp * NREP + 2 * c + 1] = m1
            wl[wp * NREP + 2 * c + 1] = l1
        for i in range(QR):  # acc[4 mt + i]: head 2c + i % 2, dimension 16 mt + 2g + (i // 2) % 2
            h = 2 * c + i % 2
            if h < NREP:
                wo[(wp * NREP + h) * HD + 16 * (i // 4) + 2 * g + (i // 2) % 2] = acc[i]
        _merge_warps(part_o, part_m, part_l, r, h0, split, wm, wl, wo, NREP, HD)

    return kernel


LO16, HI16, SH16 = uint32(0xFFFF), uint32(0xFFFF0000), uint32(16)


@cuda.jit(device=True, inline=True)
def _weighted_v_mma(acc, vsh, ps, pw, vw, a0, a1, g, c, mbuf, MV, RS, PR):
    """acc (heads 2c, 2c + 1 at dimensions 16 mt + 2g, + 1; 4 a slice mt) rescaled by a0, a1 and plus this
    tile's weights ps[pw + head * PR + key] times its V rows vsh[vw + key * RS ..]: O^T += V^T P^T, a
    product a 16-dimension slice mt of V. Row g of a slice's A is dimension 2g, row g + 8 dimension
    2g + 1, so one word of a key row holds both and a fragment register is two words' halves; P^T is B,
    rounded to float16 hi + lo as q is (float32's precision). The lane holds the rescale factors of its
    heads. A tile costs a lane 16 products and 32 shared loads here, where a lane owning 4 dimensions of
    every head spent ~512 multiply-adds and 128 weight loads (8k keys: 26.4 -> 20.3 us, stop 18)."""
    sync_warp()  # the tile's weights and V rows are in shared memory
    for i in range(4 * MV):
        acc[i] *= a0 if i % 2 == 0 else a1
    q = pw + g * PR + 2 * c  # B = P^T: keys 2c, 2c + 1 (b0) and 2c + 8, 2c + 9 (b1) of head g
    bh0, bl0 = _hi_lo(ps[q], ps[q + 1])
    bh1, bl1 = _hi_lo(ps[q + 8], ps[q + 9])
    for mt in range(MV):
        w = vw + 2 * c * RS + 8 * mt + g  # key 2c's word of dimensions 16 mt + 2g, + 1
        w0, w1, w2, w3 = vsh[w], vsh[w + RS], vsh[w + 8 * RS], vsh[w + 9 * RS]
        f0 = (w0 & LO16) | (w1 << SH16)  # A rows g (dimension 16 mt + 2g) and g + 8 (+ 1), keys 2c, 2c + 1
        f1 = (w0 >> SH16) | (w1 & HI16)
        f2 = (w2 & LO16) | (w3 << SH16)  # keys 2c + 8, 2c + 9
        f3 = (w2 >> SH16) | (w3 & HI16)
        d0, d1, d2, d3 = mma_f16(f0, f1, f2, f3, bh0, bh1, acc[4 * mt], acc[4 * mt + 1], acc[4 * mt + 2],
                                 acc[4 * mt + 3], mbuf)
        acc[4 * mt], acc[4 * mt + 1], acc[4 * mt + 2], acc[4 * mt + 3] = mma_f16(f0, f1, f2, f3, bl0, bl1, d0, d1,
                                                                                d2, d3, mbuf)
    sync_warp()  # read before the next tile's overwrite


@cuda.jit(device=True, inline=True)
def _rope_query(xr, qkv, rope, r, h, c, p, red, HD):
    """xr[0 : HD/4] = dims c HD/4 .. of query head h of row r, normed (qn) and rotated at position p, as
    koifish_cuda.rope computes them: the four lanes of a g hold a head; every lane of the block calls it."""
    qn, kn, cos, sin, eps = rope
    Q = HD // 4
    HALF = HD // 2
    ss = float32(0.0)
    for i in range(0, Q, 4):
        xr[i], xr[i + 1], xr[i + 2], xr[i + 3] = load4(qkv, (r, h * HD + c * Q + i))
    for i in range(Q):
        ss += xr[i] * xr[i]
    ss += shfl_xor(ss, 1, red)
    ss += shfl_xor(ss, 2, red)
    rstd = float32(1.0) / math.sqrt(ss / float32(HD) + eps)
    for i in range(Q):
        xr[i] = qn[c * Q + i] * (xr[i] * rstd)
    for i in range(Q):  # the partner of dim d is d +- HD/2, the same i in lane c ^ 2
        xr[i] = _rotate_half(xr[i], shfl_xor(xr[i], 2, red), c * Q + i, p, cos, sin, HALF)


@cuda.jit(device=True, inline=True)
def _store_new_kv(k_cache, v_cache, qkv, rope, r, b, kvh, nh, p, red, HD, DPL):
    """Key head kvh of row r normed (kn) and rotated at position p, and its value head, stored as float16
    into the caches (uint32 views) at p: lane l holds dims l DPL .. (its RoPE partner in lane l ^ 16).
    Every warp computes it (the simulator's sums are block-wide); warp 0 stores."""
    qn, kn, cos, sin, eps = rope
    HALF = HD // 2
    lane = cuda.threadIdx.x % 32
    kx = cuda.local.array(DPL, float32)
    ss = float32(0.0)
    for e in range(DPL):
        kx[e] = qkv[r, (nh + kvh) * HD + lane * DPL + e]
        ss += kx[e] * kx[e]
    rstd = float32(1.0) / math.sqrt(warp_sum(ss, red) / float32(HD) + eps)
    for e in range(DPL):
        kx[e] = kn[lane * DPL + e] * (kx[e] * rstd)
    for e in range(DPL):
        kx[e] = _rotate_half(kx[e], shfl_xor(kx[e], 16, red), lane * DPL + e, p, cos, sin, HALF)
    if cuda.threadIdx.x < 32:
        vcol = (nh + k_cache.shape[1] + kvh) * HD + lane * DPL
        for i in range(DPL // 2):
            k_cache[b, kvh, p, lane * (DPL // 2) + i] = pack_f16x2(kx[2 * i], kx[2 * i + 1])
            v_cache[b, kvh, p, lane * (DPL // 2) + i] = pack_f16x2(qkv[r, vcol + 2 * i], qkv[r, vcol + 2 * i + 1])


@cuda.jit(device=True, inline=True)
def _rotate_half(x, other, d, p, cos, sin, HALF):
    """RoPE of dim d at position p (koifish_cuda.rope's rotate-half), given its partner d +- HALF's value."""
    rot = -other if d < HALF else other
    return x * cos[p, d % HALF] + rot * sin[p, d % HALF]


@cuda.jit(device=True, inline=True)
def _hi_lo(x0, x1):
    """(hi, lo): x0, x1 as two float16 pairs whose sum is x to ~2^-22 (hi rounded, lo the remainder)."""
    h = pack_f16x2(x0, x1)
    f0, f1 = unpack_f16x2(h)
    return h, pack_f16x2(x0 - f0, x1 - f1)


@cuda.jit(device=True, inline=True)
def _start_heads(q, r, h0, d0, scale, qr, acc, m, lsum, NREP, HD, DPL):
    """The lane's dimensions d0.. of the NREP heads' queries (scaled) in qr; the online softmax's state
    empty."""
    for j in range(NREP):
        for e in range(DPL):
            qr[j * DPL + e] = q[r, (h0 + j) * HD + d0 + e] * scale
            acc[j * DPL + e] = float32(0.0)
        m[j] = NEG_INF
        lsum[j] = float32(0.0)


@cuda.jit(device=True, inline=True)
def _online_update(qr, kr, vr, ko, m, lsum, acc, live, red, NREP, DPL):
    """One key (its lane's K dimensions kr[ko:ko+DPL], V vr[ko:..]) into the NREP heads' online softmax:
    each head's score summed over the warp (every lane takes part, live or not), then, for a live key,
    the running max, sum and output rescaled and the key's weight added."""
    for j in range(NREP):
        p = float32(0.0)
        for e in range(DPL):
            p += qr[j * DPL + e] * kr[ko + e]
        sv = warp_sum(p, red)
        if live:
            mn = max(m[j], sv)
            c = math.exp(m[j] - mn)
            pe = math.exp(sv - mn)
            lsum[j] = lsum[j] * c + pe
            for e in range(DPL):
                acc[j * DPL + e] = acc[j * DPL + e] * c + pe * vr[ko + e]
            m[j] = mn


@cuda.jit(device=True, inline=True)
def _combine_warps(part_o, part_m, part_l, r, h0, split, m, lsum, acc, wm, wl, wo, NREP, HD, DPL):
    """The block's warps' online-softmax states (m and l warp-uniform, lane l's acc dimensions
    l * DPL ..) merged through shared memory (wm, wl: WARPS * NREP; wo: WARPS * NREP * HD) into the
    split's partial output, max and sum."""
    lane = cuda.threadIdx.x % 32
    wp = cuda.threadIdx.x // 32
    for j in range(NREP):
        if lane == 0:
            wm[wp * NREP + j] = m[j]
            wl[wp * NREP + j] = lsum[j]
    _finish_warps(part_o, part_m, part_l, r, h0, split, acc, wm, wl, wo, NREP, HD, DPL)


@cuda.jit(device=True, inline=True)
def _finish_warps(part_o, part_m, part_l, r, h0, split, acc, wm, wl, wo, NREP, HD, DPL):
    """_combine_warps once each warp's max and sum are in wm and wl: the outputs stashed, then merged."""
    lane = cuda.threadIdx.x % 32
    wp = cuda.threadIdx.x // 32
    for j in range(NREP):
        for e in range(DPL):
            wo[(wp * NREP + j) * HD + lane * DPL + e] = acc[j * DPL + e]
    _merge_warps(part_o, part_m, part_l, r, h0, split, wm, wl, wo, NREP, HD)


@cuda.jit(device=True, inline=True)
def _merge_warps(part_o, part_m, part_l, r, h0, split, wm, wl, wo, NREP, HD):
    """The warps' maxima, sums (wm, wl) and outputs (wo, [warp][head][dimension]) merged into the split's partials."""
    tid = cuda.threadIdx.x
    cuda.syncthreads()
    for i in range(tid, NREP * HD, THREADS):
        j = i // HD
        d = i % HD
        mx = NEG_INF
        for w in range(WARPS):
            mx = max(mx, wm[w * NREP + j])
        o = float32(0.0)
        den = float32(0.0)
        for w in range(WARPS):
            c = math.exp(wm[w * NREP + j] - mx)  # a warp that saw no key: m NEG_INF, l and o 0
            o += c * wo[(w * NREP + j) * HD + d]
            den += c * wl[w * NREP + j]
        part_o[r, h0 + j, split, d] = o
        if d == 0:
            part_m[r, h0 + j, split] = mx
            part_l[r, h0 + j, split] = den


@cuda.jit(device=True, inline=True)
def _keep(xq, vals, t, h, hd):
    pass


@cuda.jit(device=True, inline=True)
def _round_head(xq, vals, t, h, hd):
    """The head's hd outputs (in vals) rounded as quant_a8.quantize_x16 rounds them: a thread a chunk."""
    cuda.syncthreads()
    if t < hd // CHUNK:
        v = cuda.local.array(CHUNK, float32)
        xw = cuda.local.array(4, uint32)
        for j in range(CHUNK):
            v[j] = vals[t * CHUNK + j]
        codes, scales, sums = xq
        store_rounded(v, h * (hd // CHUNK) + t, codes, scales, sums, xw)


@functools.lru_cache(maxsize=None)
def _merge_kernel(rounds: bool):
    """The merge; rounds: one row whose output the next W4A8 GEMV reads (xq, quant_a8.quantize_x16's
    triple), rounded here instead of by a kernel of its own."""
    finish = _round_head if rounds else _keep

    @aware
    @cuda.jit(cache=True)
    def kernel(out, part_o, part_m, part_l, xq, pos, T, min_chunk, pf):
        begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
        work = part_m.shape[0] * part_m.shape[1]  # a block a (row, head); the blocks past them prefetch pf
        if cuda.blockIdx.x >= work:
            prefetch_share(pf, cuda.blockIdx.x - work, cuda.gridDim.x - work)
            return
        vals = cuda.shared.array(HD_MAX, float32)
        h, hd = _merge(out, part_o, part_m, part_l, vals, pos, T, min_chunk)
        finish(xq, vals, cuda.threadIdx.x, h, hd)

    return kernel


@cuda.jit(device=True, inline=True)
def _merge(out, part_o, part_m, part_l, vals, pos, T, min_chunk):
    """One block per (row, head): the splits' weights exp(m_s - max) in shared memory (splits <= THREADS),
    then each thread one output dimension, its split loads four at a time (also kept in vals). Only the
    splits that hold keys (_split_keys with the same min_chunk) are read: an empty one may be unwritten."""
    nh = part_m.shape[1]
    hd = part_o.shape[3]
    r = cuda.blockIdx.x // nh
    L = pos[0] + r % T + 1
    chunk = _chunk_keys(L, part_m.shape[2], min_chunk)
    S = min(part_m.shape[2], (L + chunk - 1) // chunk)
    h = cuda.blockIdx.x % nh
    t = cuda.threadIdx.x
    buf = cuda.shared.array(THREADS, float32)
    wbuf = cuda.shared.array(32, float32)
    ws = cuda.shared.array(THREADS, float32)
    ms = part_m[r, h, t] if t < S else NEG_INF
    ls = part_l[r, h, t] if t < S else float32(0.0)  # loaded with ms: one trip to memory, not two
    m = block_reduce_warps(ms, buf, wbuf, True)  # by warps: two barriers, where the tree over 128 takes seven
    w = math.exp(ms - m) if t < S else float32(0.0)
    ws[t] = w
    den = block_reduce_warps(ls * w, buf, wbuf, False)  # (its barriers publish ws)
    inv = float32(1.0) / den
    for d in range(t, hd, THREADS):
        num = float32(0.0)
        for s0 in range(0, S - 3, 4):  # four independent loads in flight
            a0 = part_o[r, h, s0, d]
            a1 = part_o[r, h, s0 + 1, d]
            a2 = part_o[r, h, s0 + 2, d]
            a3 = part_o[r, h, s0 + 3, d]
            num += a0 * ws[s0] + a1 * ws[s0 + 1] + a2 * ws[s0 + 2] + a3 * ws[s0 + 3]
        for s in range(S - S % 4, S):
            num += part_o[r, h, s, d] * ws[s]
        out[r, h * hd + d] = num * inv
        vals[d] = num * inv
    return h, hd


def check_shapes(nh: int, nkv: int, hd: int) -> None:
    g = nh // nkv
    if nh % nkv or g > G_MAX or hd > HD_MAX or HD_MAX % hd or hd < 16:
        raise ValueError(f"attention kernel: {nh} query heads over {nkv} kv heads of {hd}: needs n_head a multiple "
                         f"of n_kv_head, at most {G_MAX} query heads per kv head and head_dim dividing {HD_MAX}, at least 16")


def attention_scratch(xp, rows: int, nh: int, hd: int, splits: int):
    """(part_o, part_m, part_l) for `rows` query rows and `splits` key splits."""
    return (xp.zeros((rows, nh, splits, hd), xp.float32), xp.zeros((rows, nh, splits), xp.float32),
            xp.zeros((rows, nh, splits), xp.float32))


@functools.lru_cache(maxsize=None)
def _tensor_cores() -> bool:
    """The current GPU runs mma.sync m16n8k16 on float16 (sm_80 and later; the simulator emulates it)."""
    return bool(config.ENABLE_CUDASIM) or cuda.get_current_device().compute_capability >= (8, 0)


def _mma_applies(q, k_cache, v_cache, nh: int) -> bool:
    nkv, hd = k_cache.shape[1], k_cache.shape[3]
    return (k_cache.dtype == np.float16 and v_cache.dtype == np.float16 and hd % 64 == 0 and nh // nkv <= 8
            and aligned(k_cache, 8) and aligned(v_cache, 4) and aligned(q, 4) and _tensor_cores())


def fuses_rope(variant: str, q, k_cache, v_cache, nh: int, T: int) -> bool:
    """Whether attention_decode can take the fused projection q (R, (nh + 2 nkv) hd) with rope=... and do
    qk_norm_rope's work itself (the mma kernel, one row per sequence)."""
    return variant == "mma" and T == 1 and _mma_applies(q, k_cache, v_cache, nh)


def attention_decode(out, q, k_cache, v_cache, pos, T: int, scratch, stream=0, k_scale=None, v_scale=None,
                     variant: str = "warps", xq=None, rope=None, prefetch=None):
    """out (R, nh*hd) = softmax(q k^T / sqrt(hd)) v over each row's visible keys; scratch from attention_scratch
    (its split count is the number of splits used, its row count at least R). An int8 cache takes its
    scales (B, nkv, max_len) float32 in k_scale, v_scale. variant: "mma" (_split_mma_kernel: float16 caches,
    head_dim a multiple of 64, at most 8 query heads a kv head; else as "warps"), "warps" (_split_warps_kernel;
    float caches with head_dim a multiple of 32, else the tile kernel runs) or "tiles" (_split_kernel). On the H200 at
    Qwen3-32B's shapes (bench_qwen3_kernels.py) warps took 21.3 us at 1k keys and 57.1 at 8k, tiles 49.0
    and 177.3; mma 11.8 and 20.3 at 32 splits of 64 keys at least (stop 18; 12.3 and 26.2 with V's
    weighted sum on the CUDA cores). xq: for one row, out also rounded into quant_a8.quantize_x16's triple
    (the o projection's input). rope = (qn, kn, cos, sin, eps): q is the fused projection (R, (nh + 2 nkv)
    hd) and the mma kernel does qk_norm_rope's work (one row per sequence, T = 1; fuses_rope says when).
    prefetch: a 1-D uint32 array (the next GEMV's weights, prefetch.weight_lines) that spare blocks of the
    merge pull into L2."""
    part_o, part_m, part_l = scratch
    R = q.shape[0]
    nh, splits = part_m.shape[1], part_m.shape[2]
    nkv, hd = k_cache.shape[1], k_cache.shape[3]
    check_shapes(nh, nkv, hd)
    if splits > THREADS:
        raise ValueError(f"attention: at most {THREADS} key splits, got {splits}")
    quant = k_cache.dtype == np.int8
    if quant and (k_scale is None or v_scale is None):
        raise ValueError("attention: an int8 KV cache needs its k_scale and v_scale arrays")
    po, pm, pl = part_o[:R], part_m[:R], part_l[:R]
    scales = (k_scale, v_scale) if quant else ()  # () adds no kernel parameter
    warps = (variant in ("warps", "mma") and not quant and hd % 32 == 0
             and (hd // 32 != 4 or (aligned(k_cache, 4) and aligned(v_cache, 4))))
    mma = variant == "mma" and _mma_applies(q, k_cache, v_cache, nh)
    if rope is not None and not (mma and T == 1):
        raise ValueError("attention: the fused q/k norm and RoPE takes the mma kernel and one row per sequence "
                         "(attention_decode.fuses_rope)")
    if mma:  # the caches as words of two float16
        kernel = _split_mma_kernel(hd, nh // nkv, rope is not None)
        k_cache, v_cache = k_cache.view(np.uint32), v_cache.view(np.uint32)
        if rope is not None:
            qn, kn, cos, sin, eps = rope
            scales = (qn, kn, cos, sin, np.float32(eps))
    elif not warps:
        kernel = _split_kernel(hd, nh // nkv, quant)
    else:
        kernel = _split_warps_kernel(hd, nh // nkv)
    if xq is not None and (R != 1 or hd % CHUNK or xq[0].shape[0] * 4 != nh * hd or xq[1].shape[0] * CHUNK != nh * hd):
        raise ValueError(f"attention: rounding the output takes one row, head_dim a multiple of {CHUNK} and a "
                         f"triple of {nh * hd} values; got {R} rows, head_dim {hd}, codes {xq[0].shape}")
    if xq is not None and not aligned(xq[0], 4):
        raise ValueError("attention: the rounded output's codes must start on a 16-byte boundary")
    pf = lines_or_none(prefetch, out)
    scale = np.float32(1.0 / math.sqrt(hd))
    if mma:  # the split kernel's spare rows prefetch (it runs longer than the merge), the merge none
        spare_rows = -(-prefetch_blocks(pf, THREADS) // (R * nkv))
        kernel[(R * nkv, splits + spare_rows), THREADS, stream](po, pm, pl, q, k_cache, v_cache, scales, pos, T,
                                                                scale, pf)
        pf = no_prefetch(out)
    else:
        kernel[(R * nkv, splits), THREADS, stream](po, pm, pl, q, k_cache, v_cache, scales, pos, T, scale)
    _merge_kernel(xq is not None)[R * nh + prefetch_blocks(pf, THREADS), THREADS, stream](
        out, po, pm, pl, () if xq is None else tuple(xq), pos, T, MMA_MIN_CHUNK if mma else 1, pf)
