"""Next-token sampling on the GPU, with the semantics of koifish_core.infer.sampling (its reference).

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw;  temperature 0 = argmax

The parameters are a device buffer (temperature, top_k, top_p, min_p, repetition_penalty), so a
captured decode graph samples with whatever the host last wrote there; `seen` (B, V) uint8 flags
the tokens of the context (the penalty's set; the kernels flag each token drawn); `rng` int64
(seed, counter): draws are a hash of (seed, counter, row, token), and the counter moves on with
advance(). Same seed and counter, same token.

Every pass runs over many blocks per row (grid (blocks, B), BLOCK_ELEMS logits a block):
    prep        penalty and temperature into zbuf; each block's first maximum (value, index);
                the count histogram of the top 8 key bits (top-k on)
    select 1-3  top-k by radix select: each block finds the digit that holds the k-th largest key
                from the previous histogram (the same integer arithmetic in every block, block 0
                stores it), then histograms the next 8 bits among the keys with that prefix
    select 4    the last top-k digit: T_k, the k-th largest key exactly; then, for top-p, the
                histogram of probability mass (exp(z - zmax), in 2^-40 fixed point: integer
                sums, so the same on every run) of the top 8 bits over keys >= T_k
    select 5-7  top-p by radix select on mass: the smallest T_p with mass(key <= T_p) > (1 - top_p)
                * total, 8 bits a pass
    draw        keeps key >= max(T_k, T_p) with weight exp(z - zmax) >= min_p, and draws among them
                by the Gumbel-max trick (argmax of z + Gumbel noise from the hash: exactly a draw
                from the kept softmax); each block's best (value, index)
    pick        one block per row: the token (the draw's best, or the argmax when greedy), flags
                it in seen, zeroes the histograms for the next step; with emit, the final
                distribution into zbuf (tests)
Keys are the logits' float bits made order-preserving unsigned integers, so the thresholds are
exact and ties at the k-th value are kept, as in the reference; top-p keeps ties at T_p (the
reference drops some of a tie in index order). Passes that the parameters switch off return at
once (greedy runs prep and pick).
"""

from __future__ import annotations

import math

import numpy as np

import koifish_cuda.compat  # noqa: F401
from koifish_cuda.pdl import aware, begin
from koifish_cuda.reduce import THREADS, block_sum
from numba import cuda, float32, float64, int32, int64

N_PARAMS = 5
INT32_MIN = -(2**31)
BLOCK_ELEMS = 1024  # logits per block of the row passes (V = 151,936: 149 blocks a row)
NBLK_MAX = 1024
BINS = 256  # 8 key bits a radix pass
STAGES = 8  # histograms a row: 4 count digits (top-k), 4 mass digits (top-p)
FIX = 2.0**40  # mass fixed point: weights <= 1, sums <= V * 2^40 < 2^63
assert BINS == 2 * THREADS


def params_array(p) -> np.ndarray:
    """SamplingParams -> the float32 device-buffer layout."""
    return np.array([p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty], np.float32)


def sample_probs_ref(logits, p, previous_ids=None) -> np.ndarray:
    """The distribution the kernel draws from (float64), from the CPU reference's filters."""
    from koifish_core.infer.sampling import filter_logits

    z = filter_logits(logits, p, previous_ids)
    if p.temperature == 0:
        out = np.zeros(z.size)
        out[int(np.argmax(z))] = 1.0
        return out
    e = np.exp(z - z.max())
    return e / e.sum()


def sample_scratch(xp, B: int, V: int, block_elems: int = BLOCK_ELEMS):
    """The passes' buffers for B rows of V logits: partial maxima, draws and sums per block, the
    radix histograms (zero between steps: the pick kernel re-zeroes them) and the select state."""
    nblk = max(1, min(NBLK_MAX, -(-V // block_elems)))
    return dict(part_v=xp.zeros((B, nblk), np.float32), part_i=xp.zeros((B, nblk), np.int32),
                part_g=xp.zeros((B, nblk), np.float32), part_gi=xp.zeros((B, nblk), np.int32),
                part_s=xp.zeros((B, nblk), np.float32), hist=xp.zeros((B, STAGES, BINS), np.int64),
                st=xp.zeros((B, STAGES + 1, 3), np.int64))


@cuda.jit(device=True, inline=True)
def _key(bits):
    """float32 bits (as int32) -> an integer with the floats' order."""
    return int64(bits) if bits >= 0 else int64(bits ^ 0x7FFFFFFF)


@cuda.jit(device=True, inline=True)
def _ukey(bits):
    """float32 bits (as int32) -> an integer in [0, 2^32) with the floats' order."""
    return _key(bits) + int64(2147483648)


@cuda.jit(device=True, inline=True)
def _mix(x):
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return ((x >> 16) ^ x) & 0xFFFFFFFF


@cuda.jit(device=True)
def _hash(seed, counter, row):
    m = int64(0xFFFFFFFF)
    h = _mix((seed & m) ^ int64(0x9E3779B9))
    h = _mix(h ^ ((seed >> 32) & m))
    h = _mix(h ^ (counter & m))
    return _mix(h ^ int64(row))


@cuda.jit(device=True)
def uniform(seed, counter, row):
    """A float32 in [0, 1) from (seed, counter, row)."""
    return float32(_hash(seed, counter, row) >> 8) * float32(1.0 / 16777216.0)


@cuda.jit(device=True)
def _gumbel(h0, i):
    """Gumbel noise -log(-log u), u in (0, 1) from the row's hash h0 and the token i."""
    u = (float32(_mix(h0 ^ int64(i)) >> 8) + float32(0.5)) * float32(1.0 / 16777216.0)
    return -math.log(-math.log(u))


@cuda.jit(device=True)
def _block_argmax(v, i, vbuf, ibuf):
    """The block's largest v, ties to the lowest i (as np.argmax); every thread gets (value, index)."""
    t = cuda.threadIdx.x
    vbuf[t] = v
    ibuf[t] = i
    cuda.syncthreads()
    s = THREADS // 2
    while s > 0:
        if t < s:
            ov = vbuf[t + s]
            oi = ibuf[t + s]
            if ov > vbuf[t] or (ov == vbuf[t] and oi < ibuf[t]):
                vbuf[t] = ov
                ibuf[t] = oi
        cuda.syncthreads()
        s //= 2
    bv = vbuf[0]
    bi = ibuf[0]
    cuda.syncthreads()
    return bv, bi


@cuda.jit(device=True)
def _row_max(part_v, b, vbuf, ibuf):
    """zmax of row b from the prep blocks' partial maxima."""
    m = float32(-math.inf)
    for i in range(cuda.threadIdx.x, part_v.shape[1], THREADS):
        m = max(m, part_v[b, i])
    bv, _ = _block_argmax(m, int32(0), vbuf, ibuf)
    return bv


@cuda.jit(device=True)
def _digit(hist, b, j, desc, acc, target, frac, sh, res):
    """The next radix digit from histogram hist[b, j] (BINS int64), every thread the same answer.

    desc (top-k, counts): the largest d with acc + sum(hist[d:]) >= target; acc' = acc + sum(hist[d+1:]).
    asc (top-p, mass): the smallest d with acc + sum(hist[:d+1]) > target; acc' = acc + sum(hist[:d]).
    frac >= 0 sets target = floor(frac * sum(hist)) first (the top-p threshold, at its first digit).
    Returns (d, acc', target)."""
    t = cuda.threadIdx.x
    sh[t] = hist[b, j, t]
    sh[t + THREADS] = hist[b, j, t + THREADS]
    cuda.syncthreads()
    off = 1
    while off < BINS:  # inclusive prefix sums
        v0 = sh[t]
        if t >= off:
            v0 += sh[t - off]
        v1 = sh[t + THREADS] + sh[t + THREADS - off]
        cuda.syncthreads()
        sh[t] = v0
        sh[t + THREADS] = v1
        cuda.syncthreads()
        off *= 2
    total = sh[BINS - 1]
    if frac >= 0.0:
        target = int64(frac * float64(total))
    if t == 0:
        res[0] = 0 if desc else BINS - 1
        res[1] = acc if desc else acc + sh[BINS - 2]
    cuda.syncthreads()
    for d in range(t, BINS, THREADS):
        p_d = sh[d]
        p_prev = sh[d - 1] if d > 0 else int64(0)
        if desc:
            if acc + total - p_prev >= target and not (d < BINS - 1 and acc + total - p_d >= target):
                res[0] = d
                res[1] = acc + total - p_d
        else:
            if acc + p_d > target and not (d > 0 and acc + p_prev > target):
                res[0] = d
                res[1] = acc + p_prev
    cuda.syncthreads()
    d = res[0]
    a = res[1]
    cuda.syncthreads()
    return d, a, target


@cuda.jit(device=True)
def _flags(params, V):
    top_k = int64(params[1])
    return top_k, top_k > 0 and top_k < V, params[2] < float32(1.0)


@cuda.jit(device=True)
def _span(V):
    """The block's slice [i0, i1) of a row of V logits: blocks along x split the row evenly."""
    chunk = (V + cuda.gridDim.x - 1) // cuda.gridDim.x
    i0 = cuda.blockIdx.x * chunk
    return i0, min(V, i0 + chunk)


@cuda.jit(device=True)
def _weight(z, zmax):
    return math.exp(z - zmax)


@cuda.jit(device=True)
def _fixed(w):
    return int64(float64(w) * FIX)


@aware
@cuda.jit(cache=True)
def prep_kernel(zbuf, zkey, hist, part_v, part_i, logits, seen, params):
    begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
    b = cuda.blockIdx.y
    blk = cuda.blockIdx.x
    t = cuda.threadIdx.x
    V = logits.shape[1]
    i0, i1 = _span(V)
    vbuf = cuda.shared.array(THREADS, float32)
    ibuf = cuda.shared.array(THREADS, int32)
    hsh = cuda.shared.array(BINS, int64)
    temp = params[0]
    pen = params[4]
    best = float32(-math.inf)
    besti = int32(V)
    for i in range(i0 + t, i1, THREADS):  # ascending per thread: its first maximum
        z = logits[b, i]
        if pen != float32(1.0) and seen[b, i] != 0:
            z = z * pen if z < float32(0.0) else z / pen
        if temp > float32(0.0):
            z = z / temp
        zbuf[b, i] = z
        if z > best:
            best = z
            besti = i
    hsh[t] = 0
    hsh[t + THREADS] = 0
    bv, bi = _block_argmax(best, besti, vbuf, ibuf)  # (syncs: zbuf is written before zkey is read)
    if t == 0:
        part_v[b, blk] = bv
        part_i[b, blk] = bi
    _, kact, _ = _flags(params, V)
    if temp <= float32(0.0) or not kact:
        return
    for i in range(i0 + t, i1, THREADS):
        cuda.atomic.add(hsh, _ukey(zkey[b, i]) >> 24, 1)
    cuda.syncthreads()
    for q in range(t, BINS, THREADS):
        if hsh[q] != 0:
            cuda.atomic.add(hist, (b, 0, q), hsh[q])


@aware
@cuda.jit(cache=True)
def select_kernel(zbuf, zkey, hist, st, part_v, params, stage):
    """Stage 1..7 of the radix selects (see the module doc)."""
    begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
    b = cuda.blockIdx.y
    blk = cuda.blockIdx.x
    t = cuda.threadIdx.x
    V = zbuf.shape[1]
    if params[0] <= float32(0.0):
        return
    top_k, kact, pact = _flags(params, V)
    if stage < 4 and not kact:
        return
    if stage > 4 and not pact:
        return
    i0, i1 = _span(V)
    sh = cuda.shared.array(BINS, int64)
    hsh = cuda.shared.array(BINS, int64)
    res = cuda.shared.array(2, int64)
    vbuf = cuda.shared.array(THREADS, float32)
    ibuf = cuda.shared.array(THREADS, int32)
    lead = blk == 0 and t == 0
    mass = stage >= 4
    tk = int64(0)
    pre = int64(0)
    shift = 0
    target = int64(0)
    if stage <= 4:  # count digit stage-1 of top-k
        if kact:
            j = stage - 1
            acc = int64(0)
            if j > 0:
                pre = st[b, j - 1, 0]
                acc = st[b, j - 1, 1]
            d, acc, _ = _digit(hist, b, j, True, acc, top_k, -1.0, sh, res)
            pre = pre * BINS + d
            if lead:
                st[b, j, 0] = pre
                st[b, j, 1] = acc
                st[b, j, 2] = top_k
        if stage == 4:
            if not pact:
                return
            tk = pre if kact else int64(0)
            pre = int64(0)
            shift = 32  # no mass digit decided yet: every key matches
        else:
            shift = 32 - 8 * stage
    else:  # mass digit stage-5 of top-p
        if kact:
            tk = st[b, 3, 0]
        j = stage - 1
        acc = int64(0)
        frac = float64(-1.0)
        if j == 4:
            frac = float64(1.0) - float64(params[2])
        else:
            pre = st[b, j - 1, 0]
            acc = st[b, j - 1, 1]
            target = st[b, j - 1, 2]
        d, acc, target = _digit(hist, b, j, False, acc, target, frac, sh, res)
        pre = pre * BINS + d
        if lead:
            st[b, j, 0] = pre
            st[b, j, 1] = acc
            st[b, j, 2] = target
        shift = 32 - 8 * (stage - 4)
    # the histogram of the next 8 bits among keys with the decided prefix (and >= T_k for mass)
    zmax = _row_max(part_v, b, vbuf, ibuf) if mass else float32(0.0)
    hsh[t] = 0
    hsh[t + THREADS] = 0
    cuda.syncthreads()
    for i in range(i0 + t, i1, THREADS):
        u = _ukey(zkey[b, i])
        if (shift == 32 or (u >> shift) == pre) and u >= tk:
            dg = (u >> (shift - 8)) & (BINS - 1)
            if mass:
                w = _fixed(_weight(zbuf[b, i], zmax))
                if w != 0:
                    cuda.atomic.add(hsh, dg, w)
            else:
                cuda.atomic.add(hsh, dg, 1)
    cuda.syncthreads()
    for q in range(t, BINS, THREADS):
        if hsh[q] != 0:
            cuda.atomic.add(hist, (b, stage, q), hsh[q])


@aware
@cuda.jit(cache=True)
def draw_kernel(zbuf, zkey, hist, st, part_v, part_g, part_gi, part_s, params, rng):
    begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
    b = cuda.blockIdx.y
    blk = cuda.blockIdx.x
    t = cuda.threadIdx.x
    V = zbuf.shape[1]
    if params[0] <= float32(0.0):
        return
    _, kact, pact = _flags(params, V)
    min_p = params[3]
    i0, i1 = _span(V)
    sh = cuda.shared.array(BINS, int64)
    res = cuda.shared.array(2, int64)
    vbuf = cuda.shared.array(THREADS, float32)
    ibuf = cuda.shared.array(THREADS, int32)
    fbuf = cuda.shared.array(THREADS, float32)
    tk = st[b, 3, 0] if kact else int64(0)
    tp = int64(0)
    if pact:
        d, _, _ = _digit(hist, b, 7, False, st[b, 6, 1], st[b, 6, 2], -1.0, sh, res)
        tp = st[b, 6, 0] * BINS + d
    T = max(tk, tp)
    if blk == 0 and t == 0:
        st[b, STAGES, 0] = T
    zmax = _row_max(part_v, b, vbuf, ibuf)
    h0 = _hash(rng[0], rng[1], b)
    best = float32(-math.inf)
    besti = int32(-1)
    s = float32(0.0)
    for i in range(i0 + t, i1, THREADS):
        if _ukey(zkey[b, i]) >= T:
            z = zbuf[b, i]
            w = _weight(z, zmax)
            if w > float32(0.0) and w >= min_p:
                s += w
                g = (z - zmax) + _gumbel(h0, i)
                if g > best or besti < 0:
                    best = g
                    besti = i
    bv, bi = _block_argmax(best, besti if besti >= 0 else int32(V), vbuf, ibuf)
    total = block_sum(s, fbuf)
    if t == 0:
        part_g[b, blk] = bv
        part_gi[b, blk] = bi
        part_s[b, blk] = total


@aware
@cuda.jit(cache=True)
def pick_kernel(tokens, seen, zbuf, zkey, hist, st, part_v, part_i, part_g, part_gi, part_s, params, emit):
    begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
    b = cuda.blockIdx.x
    t = cuda.threadIdx.x
    V = zbuf.shape[1]
    nblk = part_v.shape[1]
    vbuf = cuda.shared.array(THREADS, float32)
    ibuf = cuda.shared.array(THREADS, int32)
    greedy = params[0] <= float32(0.0)
    best = float32(-math.inf)
    besti = int32(V)
    for k in range(t, nblk, THREADS):  # the argmax (greedy, and the fallback)
        v = part_v[b, k]
        if v > best:
            best = v
            besti = part_i[b, k]
    zmax, amax = _block_argmax(best, besti, vbuf, ibuf)
    if amax >= V:  # every logit NaN: still a valid id, so the next embedding lookup stays in range
        amax = 0
    tok = amax
    if not greedy:
        best = float32(-math.inf)
        besti = int32(V)
        for k in range(t, nblk, THREADS):
            v = part_g[b, k]
            i = part_gi[b, k]
            if i < V and (v > best or (v == best and i < besti)):
                best = v
                besti = i
        _, gi = _block_argmax(best, besti, vbuf, ibuf)
        if gi < V:
            tok = gi
    if t == 0:
        tokens[b] = tok
        seen[b, tok] = 1
    for e in range(t, STAGES * BINS, THREADS):  # ready for the next step
        hist[b, e // BINS, e % BINS] = 0
    if emit and not greedy:  # the final distribution, for tests
        s = float32(0.0)
        for k in range(t, nblk, THREADS):
            s += part_s[b, k]
        total = block_sum(s, vbuf)
        T = st[b, STAGES, 0]
        min_p = params[3]
        for i in range(t, V, THREADS):
            w = float32(0.0)
            if _ukey(zkey[b, i]) >= T:
                w = _weight(zbuf[b, i], zmax)
                if w < min_p:
                    w = float32(0.0)
            zbuf[b, i] = w / total


@aware
@cuda.jit(cache=True)
def advance_kernel(rng, pos, dpos):
    begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
    if cuda.grid(1) == 0:
        rng[1] += 1
        pos[0] += dpos


def sample(tokens, seen, zbuf, logits, params, rng, scratch, emit: bool = False, stream=0):
    """tokens (B,) int32 from logits (B, V); zbuf (B, V) float32 scratch (the final probabilities with
    emit); scratch from sample_scratch(xp, B, V)."""
    host_buf = None
    if isinstance(zbuf, np.ndarray):  # the simulator copies each host argument apart: alias on a device array
        host_buf, zbuf = zbuf, cuda.to_device(zbuf)
    zkey = zbuf.view(np.int32)
    s = scratch
    B = logits.shape[0]
    grid = (s["part_v"].shape[1], B)
    prep_kernel[grid, THREADS, stream](zbuf, zkey, s["hist"], s["part_v"], s["part_i"], logits, seen, params)
    for stage in range(1, STAGES):
        select_kernel[grid, THREADS, stream](zbuf, zkey, s["hist"], s["st"], s["part_v"], params, stage)
    draw_kernel[grid, THREADS, stream](zbuf, zkey, s["hist"], s["st"], s["part_v"], s["part_g"], s["part_gi"],
                                       s["part_s"], params, rng)
    pick_kernel[B, THREADS, stream](tokens, seen, zbuf, zkey, s["hist"], s["st"], s["part_v"], s["part_i"],
                                    s["part_g"], s["part_gi"], s["part_s"], params, emit)
    if host_buf is not None:
        zbuf.copy_to_host(host_buf)


def advance(rng, pos, dpos: int = 1, stream=0):
    """Next draw counter; pos[0] += dpos (the decode graph moves its position on by one)."""
    advance_kernel[1, 32, stream](rng, pos, dpos)
