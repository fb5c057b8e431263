"""RMSNorm with the residual add fused in front (Qwen3's pre-norm blocks).

    x += delta            (optional: the previous sublayer's output joins the residual stream)
    out = w * (x / sqrt(mean(x^2) + eps))

One block per row (128 threads, or up to 1024 for the few rows of a decode step); float32
throughout, as transformers computes Qwen3's RMSNorm. add_rmsnorm_x16 (batch 1) also rounds its
output to int8 for the next W4A8 GEMV (quant_a8), in the same kernel.
"""

from __future__ import annotations

import math

import numpy as np

import koifish_cuda.compat  # noqa: F401
from koifish_cuda.pdl import aware, begin
from koifish_cuda.compat import nb
from koifish_cuda.bf16 import f32_to_bf16
from koifish_cuda.reduce import THREADS, block_reduce_warps, block_sum
from koifish_cuda.prefetch import lines_or_none, prefetch_blocks, prefetch_share
from koifish_cuda.quant_a8 import CHUNK, store_rounded
from koifish_cuda.vload import aligned, load4, store4
from numba import config, cuda, float32, uint32


def add_rmsnorm_ref(x: np.ndarray, delta: np.ndarray | None, w: np.ndarray, eps: float):
    """(new x, out) in float64."""
    x = np.asarray(x, np.float64) + (0.0 if delta is None else np.asarray(delta, np.float64))
    rstd = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    return x, np.asarray(w, np.float64) * (x * rstd)


THREADS_MAX = 1024  # a block of a few rows (decode): wide, so each thread's loads are few


@aware
@cuda.jit(cache=True)
def add_rmsnorm_kernel(out, x, delta, w, eps, add, as_bf16):
    """A block per row, any multiple of 32 threads. The first pass only loads (x is written in the
    second, with the same sum recomputed): no store orders one turn's loads after the last's."""
    begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
    r = cuda.blockIdx.x
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    C = x.shape[1]
    buf = cuda.shared.array(THREADS_MAX, float32)
    ss = float32(0.0)
    for i in range(t, C, nt):
        v = x[r, i]
        if add:
            v += delta[r, i]
        ss += v * v
    total = block_sum(ss, buf)
    rstd = float32(1.0) / math.sqrt(total / float32(C) + eps)
    for i in range(t, C, nt):
        v = x[r, i]
        if add:
            v += delta[r, i]
            x[r, i] = v
        y = w[i] * (v * rstd)
        if as_bf16:
            out[r, i] = f32_to_bf16(y)
        else:
            out[r, i] = y


def add_rmsnorm(out, x, delta, w, eps: float, stream=0):
    """out (R, C) = rmsnorm(x (+= delta)) * w; delta None normalizes x as it is. out is float32, or uint16
    for bf16 bits (the operand of the prefill's GEMMs, rounded as koifish_cuda.bf16.to_bf16_ref)."""
    add = delta is not None
    R, C = x.shape
    wide = R < 64 and not config.ENABLE_CUDASIM  # a few rows: one wide block each (the simulator keeps 128)
    threads = min(THREADS_MAX, max(THREADS, 1 << (C // 4 - 1).bit_length())) if wide else THREADS  # a power of two
    add_rmsnorm_kernel[R, threads, stream](nb(out), nb(x), nb(delta if add else x), nb(w), np.float32(eps), add,
                                           out.dtype == np.uint16)


# ---- batch 1, x rounded for the W4A8 GEMV in the same kernel -------------------------------------
@cuda.jit(device=True, inline=True)
def _load_chunk(x, delta, c0, v, add):
    """v = x[0, c0:c0+16] (+ delta's), by 16-byte loads."""
    for j in range(0, CHUNK, 4):
        v[j], v[j + 1], v[j + 2], v[j + 3] = load4(x, (0, c0 + j))
        if add:
            d0, d1, d2, d3 = load4(delta, (0, c0 + j))
            v[j] += d0
            v[j + 1] += d1
            v[j + 2] += d2
            v[j + 3] += d3


@cuda.jit(device=True, inline=True)
def _load_w(w, c0, wv):
    """wv = w[c0:c0+16], by 16-byte loads."""
    for j in range(0, CHUNK, 4):
        wv[j], wv[j + 1], wv[j + 2], wv[j + 3] = load4(w, (c0 + j,))


@cuda.jit(device=True, inline=True)
def _finish_chunk(out, xq, xs, xsum, x, wv, v, c, rstd, add, xw):
    """Chunk c (its x + delta in v, its weights in wv): x written back when added, w * v * rstd written
    to out and rounded into the triple (quant_a8.store_rounded)."""
    c0 = c * CHUNK
    for j in range(0, CHUNK, 4):
        if add:
            store4(x, (0, c0 + j), v[j], v[j + 1], v[j + 2], v[j + 3])
        v[j] = wv[j] * (v[j] * rstd)
        v[j + 1] = wv[j + 1] * (v[j + 1] * rstd)
        v[j + 2] = wv[j + 2] * (v[j + 2] * rstd)
        v[j + 3] = wv[j + 3] * (v[j + 3] * rstd)
        store4(out, (0, c0 + j), v[j], v[j + 1], v[j + 2], v[j + 3])
    store_rounded(v, c, xq, xs, xsum, xw)


@cuda.jit(device=True, inline=True)
def norm_row_x16(out, xq, xs, xsum, x, delta, w, eps, add, buf, wbuf):
    """add_rmsnorm_x16's work by one block of any whole number of warps, thread t on chunks t, t + nt, ..
    (vector loads and stores): the row's sum of squares by warps (block_reduce_warps: two barriers,
    where block_sum's tree over 512 threads takes ten), then each chunk written and rounded. A thread's
    last chunk stays in registers between the passes (with a chunk a thread, nothing is loaded twice);
    any others are loaded again. The weights of that last chunk are loaded with it, before the sum: not
    a second round trip to memory after it."""
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n = x.shape[1] // CHUNK
    v = cuda.local.array(CHUNK, float32)
    wv = cuda.local.array(CHUNK, float32)
    xw = cuda.local.array(4, uint32)
    ss = float32(0.0)
    last = -1
    for c in range(t, n, nt):
        _load_chunk(x, delta, c * CHUNK, v, add)
        _load_w(w, c * CHUNK, wv)  # in flight with x's (only the last chunk's are kept)
        for j in range(CHUNK):
            ss += v[j] * v[j]
        last = c
    total = block_reduce_warps(ss, buf, wbuf, False)
    rstd = float32(1.0) / math.sqrt(total / float32(x.shape[1]) + eps)
    if last >= 0:
        _finish_chunk(out, xq, xs, xsum, x, wv, v, last, rstd, add, xw)
    for c in range(t, last, nt):
        _load_chunk(x, delta, c * CHUNK, v, add)
        _load_w(w, c * CHUNK, wv)
        _finish_chunk(out, xq, xs, xsum, x, wv, v, c, rstd, add, xw)


@aware
@cuda.jit(cache=True)
def add_rmsnorm_x16_kernel(out, xq, xs, xsum, x, delta, w, eps, add, pf):
    """Block 0, a thread a chunk of 16 (norm_row_x16); any further blocks prefetch pf into L2."""
    begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
    if cuda.blockIdx.x > 0:
        prefetch_share(pf, cuda.blockIdx.x - 1, cuda.gridDim.x - 1)
        return
    buf = cuda.shared.array(THREADS_MAX, float32)  # the simulator's warp sums (unused on a GPU)
    wbuf = cuda.shared.array(32, float32)
    norm_row_x16(out, xq, xs, xsum, x, delta, w, eps, add, buf, wbuf)


X16_MAX = CHUNK * THREADS_MAX  # the widest row add_rmsnorm_x16 takes (a thread a chunk, one block)


def add_rmsnorm_x16(out, xq, x, delta, w, eps: float, stream=0, prefetch=None):
    """add_rmsnorm of one row, its result also rounded as quant_a8.quantize_x16 rounds it into the triple
    xq = (codes (C/4,) uint32, scales (C/16,) float32, sums (C/16,) int32): the decode step's norm and
    its GEMV's rounding in one kernel. C a multiple of 16, at most 16 x 1024; rows 16-byte aligned.
    prefetch: a 1-D uint32 array (the next GEMV's weights, prefetch.weight_lines) spare blocks pull into L2."""
    R, C = x.shape
    if R != 1 or C % CHUNK or C > X16_MAX or xq[0].shape[0] * 4 != C or xq[1].shape[0] * CHUNK != C:
        raise ValueError(f"add_rmsnorm_x16: one row of a multiple of {CHUNK} values (at most {CHUNK * THREADS_MAX}) "
                         f"and its triple; got x {x.shape}, codes {xq[0].shape}, scales {xq[1].shape}")
    add = delta is not None
    if not all(aligned(a, 4) for a in (out, x, w, xq[0], delta if add else x)):
        raise ValueError("add_rmsnorm_x16: every array must start on a 16-byte boundary")
    threads = -(-(C // CHUNK) // 32) * 32  # whole warps (block_reduce_warps)
    pf = lines_or_none(prefetch, x)
    add_rmsnorm_x16_kernel[1 + prefetch_blocks(pf, threads), threads, stream](
        out, *xq, x, delta if add else x, w, np.float32(eps), add, pf)
