"""Next-token sampling on the GPU, with the semantics of koifish_core.infer.sampling (its reference).

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw;  temperature 0 = argmax

One block per batch row. The parameters are a device buffer (temperature, top_k, top_p, min_p,
repetition_penalty), so a captured decode graph samples with whatever the host last wrote there;
`seen` (B, V) uint8 flags the tokens of the context (the penalty's set; the kernel flags each
token it draws); `rng` int64 (seed, counter): draws are a hash of (seed, counter, row), and the
counter moves on with advance(). Same seed and counter, same token.

top-k and top-p are thresholds found by bisection over the logits' float bits read as sortable
integers (exact: ties at the k-th value are kept, as in the reference): top-k keeps keys >= the
largest T with count(key >= T) >= k; top-p keeps keys >= the smallest T with
sum(p[key <= T]) > 1 - top_p (the reference's "cumulative ascending mass <= 1 - top_p is
dropped", up to tie order). The draw inverts the cumulative weights in index order.
"""

from __future__ import annotations

import math

import numpy as np

import koifish_cuda.compat  # noqa: F401
from koifish_cuda.reduce import THREADS, block_sum
from numba import cuda, float32, int32, int64

N_PARAMS = 5
INT32_MIN = -(2**31)


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


@cuda.jit(device=True, inline=True)
def _key(bits):
    """float32 bits (as int32) -> an integer with the floats' order."""
    return int64(bits) if bits >= 0 else int64(bits ^ 0x7FFFFFFF)


@cuda.jit(device=True, inline=True)
def _mix(x):
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return ((x >> 16) ^ x) & 0xFFFFFFFF


@cuda.jit(device=True)
def uniform(seed, counter, row):
    """A float32 in [0, 1) from (seed, counter, row)."""
    m = int64(0xFFFFFFFF)
    h = _mix((seed & m) ^ int64(0x9E3779B9))
    h = _mix(h ^ ((seed >> 32) & m))
    h = _mix(h ^ (counter & m))
    h = _mix(h ^ int64(row))
    return float32(h >> 8) * float32(1.0 / 16777216.0)


@cuda.jit(cache=True)
def sample_kernel(tokens, seen, zbuf, zkey, logits, params, rng, emit):
    b = cuda.blockIdx.x
    t = cuda.threadIdx.x
    V = logits.shape[1]
    seg = (V + THREADS - 1) // THREADS
    i0 = t * seg
    i1 = min(V, i0 + seg)
    buf = cuda.shared.array(THREADS, float32)
    ibuf = cuda.shared.array(THREADS, int32)
    pref = cuda.shared.array(THREADS, float32)
    res = cuda.shared.array(2, float32)
    pick = cuda.shared.array(1, int32)
    temp = params[0]
    top_k = int32(params[1])
    top_p = params[2]
    min_p = params[3]
    pen = params[4]
    neg_inf = float32(-math.inf)
    # penalty and temperature, and each thread's first maximum
    best = neg_inf
    besti = int32(V)
    for i in range(i0, i1):
        z = logits[b, i]
        if pen != float32(1.0) and seen[b, i] != 0:
            z = z * pen if z < float32(0.0) else z / pen
        if temp > float32(0.0):
            z = z / temp
        zbuf[b, i] = z
        if z > best:
            best = z
            besti = i
    buf[t] = best
    ibuf[t] = besti
    cuda.syncthreads()
    s = THREADS // 2
    while s > 0:  # block argmax; ties go to the lowest index, as np.argmax
        if t < s:
            ov = buf[t + s]
            oi = ibuf[t + s]
            if ov > buf[t] or (ov == buf[t] and oi < ibuf[t]):
                buf[t] = ov
                ibuf[t] = oi
        cuda.syncthreads()
        s //= 2
    zmax = buf[0]
    amax = ibuf[0]
    if amax >= V:  # every logit NaN: still a valid id, so the next embedding lookup stays in range
        amax = 0
    cuda.syncthreads()
    if temp <= float32(0.0):
        if t == 0:
            tokens[b] = amax
            seen[b, amax] = 1
        return
    kmax = _key(zkey[b, amax])
    if top_k > 0 and top_k < V:
        lo = int64(INT32_MIN)  # count(key >= lo) = V >= k
        hi = kmax + 1  # count(key >= hi) = 0 < k
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            c = float32(0.0)
            for i in range(i0, i1):
                if _key(zkey[b, i]) >= mid:
                    c += float32(1.0)
            if block_sum(c, buf) >= float32(top_k):
                lo = mid
            else:
                hi = mid
        for i in range(i0, i1):
            if _key(zkey[b, i]) < lo:
                zbuf[b, i] = neg_inf
    if top_p < float32(1.0):
        own = float32(0.0)
        for i in range(i0, i1):
            own += math.exp(zbuf[b, i] - zmax)
        thr = (float32(1.0) - top_p) * block_sum(own, buf)
        lo = int64(INT32_MIN) - 1  # mass(key <= lo) = 0 <= thr
        hi = kmax  # mass(key <= hi) = all > thr
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            c = float32(0.0)
            for i in range(i0, i1):
                if _key(zkey[b, i]) <= mid:
                    c += math.exp(zbuf[b, i] - zmax)
            if block_sum(c, buf) > thr:
                hi = mid
            else:
                lo = mid
        for i in range(i0, i1):
            if _key(zkey[b, i]) < hi:
                zbuf[b, i] = neg_inf
    # min-p and the draw: weights exp(z - zmax), those below min_p dropped
    own = float32(0.0)
    for i in range(i0, i1):
        w = math.exp(zbuf[b, i] - zmax)
        if w < min_p:
            w = float32(0.0)
        own += w
    buf[t] = own
    cuda.syncthreads()
    if t == 0:
        acc = float32(0.0)
        for j in range(THREADS):
            pref[j] = acc
            acc += buf[j]
        res[0] = acc
        res[1] = uniform(rng[0], rng[1], b) * acc
        pick[0] = amax  # if rounding puts u past the last weight
    cuda.syncthreads()
    total = res[0]
    u = res[1]
    start = pref[t]
    if own > float32(0.0) and u >= start and u < start + own:
        a = start
        chosen = int32(-1)
        for i in range(i0, i1):
            w = math.exp(zbuf[b, i] - zmax)
            if w < min_p:
                w = float32(0.0)
            if w > float32(0.0):
                a += w
                chosen = i
                if a > u:
                    break
        pick[0] = chosen
    cuda.syncthreads()
    if t == 0:
        tokens[b] = pick[0]
        seen[b, pick[0]] = 1
    if emit:  # the final distribution, for tests
        for i in range(i0, i1):
            w = math.exp(zbuf[b, i] - zmax)
            if w < min_p:
                w = float32(0.0)
            zbuf[b, i] = w / total


@cuda.jit(cache=True)
def advance_kernel(rng, pos, dpos):
    if cuda.grid(1) == 0:
        rng[1] += 1
        pos[0] += dpos


def sample(tokens, seen, zbuf, logits, params, rng, emit: bool = False, stream=0):
    """tokens (B,) int32 from logits (B, V); zbuf (B, V) float32 scratch (the final probabilities with emit)."""
    host_buf = None
    if isinstance(zbuf, np.ndarray):  # the simulator copies each host argument apart: alias on a device array
        host_buf, zbuf = zbuf, cuda.to_device(zbuf)
    sample_kernel[logits.shape[0], THREADS, stream](tokens, seen, zbuf, zbuf.view(np.int32), logits, params, rng,
                                                    emit)
    if host_buf is not None:
        zbuf.copy_to_host(host_buf)


def advance(rng, pos, dpos: int = 1, stream=0):
    """Next draw counter; pos[0] += dpos (the decode graph moves its position on by one)."""
    advance_kernel[1, 32, stream](rng, pos, dpos)
