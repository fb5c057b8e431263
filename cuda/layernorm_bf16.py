"""LayerNorm on an all-bf16 row (precision.residual and residual_grad bf16): a warp per row, 16-byte loads.

The general kernels (layernorm.py) take a row's columns four at a time, 8 bytes of bf16 a load, and the
backward walks a row per block with two barriers; at 16384 x 768 on an H200 they moved 1.8 TB/s
(forward) and 1.6 TB/s (backward) of bf16 where a copy kernel moves 3.9 (probe_read_bandwidth, stop 20).
Here a warp owns a row and lane l its columns 8 (l + 32 k) .. + 7, k < G (C = 256 G): every load is 16
bytes (four uint32 words of bf16 pairs), the row's reductions are shuffles, and no barrier stands
between rows. The backward's column sums (dw, db, and dsum, the new dx's) stay in each lane's registers
for all the rows its warp takes; the block adds its warps' sums in shared memory once, and each block
adds its sums into dw/db/dsum once (red.global.add.v4). Same arithmetic as layernorm.py's kernels
(float32, the row's mean and rstd from its registers), so layernorm_forward_ref/_backward_ref check both.
"""

from __future__ import annotations

import functools
import math

import numpy as np

import koifish_cuda.compat  # noqa: F401
from koifish_cuda.bf16 import pack_word, word_hi, word_lo
from koifish_cuda.reduce import warp_sum
from koifish_cuda.vload import aligned, load4, red_add4, store4
from numba import cuda, float32, uint32

WARPS = 4  # warps (rows in flight, R each) a block
FORWARD_ROWS = 2  # rows a warp of the forward loads before it reduces any
MAX_G = 4  # C up to 1024 (GPT-2 124M and 355M); wider rows hold too many registers: layernorm.py's kernels
FORWARD_BLOCKS = 1056  # the forward's grid at most (eight blocks an SM of an H100/H200), walked grid-stride
BACKWARD_BLOCKS = 396  # the backward's: its lanes hold ~170 registers, three 128-thread blocks an SM


def fits(C: int, rows, vectors) -> bool:
    """These kernels take the call: C a multiple of 256 up to 256 MAX_G, every row array bf16 (uint16),
    rows and float32 vectors (w, b, dw, db, dsum) aligned to 16 bytes."""
    return (C % 256 == 0 and C // 256 <= MAX_G and all(a.dtype == np.uint16 and aligned(a, 8) for a in rows)
            and all(a is None or a.size == 0 or (a.dtype == np.float32 and aligned(a, 4)) for a in vectors))


@functools.lru_cache(maxsize=None)
def _forward_kernel(G: int, R: int):
    PER = 8 * G * R  # a local array's size must be a plain constant, not an expression
    BUF = 32 * WARPS

    @cuda.jit(cache=True)
    def kernel(out, mean, rstd, x, w, b, eps):
        """x, out (N, C / 2) uint32 words (bf16 pairs, lower column low); w, b (1, C) float32. Warp j of
        the block takes rows base + R j .. + R - 1 of each turn (turns block-uniform: the simulator's
        warp sums are block-wide)."""
        N = x.shape[0]
        C = 2 * x.shape[1]
        buf = cuda.shared.array(BUF, float32)
        lane = cuda.threadIdx.x % 32
        first = (cuda.threadIdx.x // 32) * R
        v = cuda.local.array(PER, float32)
        for base in range(cuda.blockIdx.x * WARPS * R, N, cuda.gridDim.x * WARPS * R):
            for q in range(R):  # every load of the R rows before any is used
                row = base + first + q
                for k in range(G):
                    o = 8 * (q * G + k)
                    u0 = u1 = u2 = u3 = uint32(0)
                    if row < N:
                        u0, u1, u2, u3 = load4(x, (row, 4 * (lane + 32 * k)))
                    v[o], v[o + 1], v[o + 2], v[o + 3] = word_lo(u0), word_hi(u0), word_lo(u1), word_hi(u1)
                    v[o + 4], v[o + 5], v[o + 6], v[o + 7] = word_lo(u2), word_hi(u2), word_lo(u3), word_hi(u3)
            for q in range(R):
                row = base + first + q
                s = float32(0.0)
                for i in range(8 * G):
                    s += v[8 * G * q + i]
                m = warp_sum(s, buf) / float32(C)
                s = float32(0.0)
                for i in range(8 * G):
                    d = v[8 * G * q + i] - m
                    s += d * d
                r = float32(1.0) / math.sqrt(warp_sum(s, buf) / float32(C) + eps)
                if row < N:
                    for k in range(G):
                        c, o = 8 * (lane + 32 * k), 8 * (q * G + k)
                        w0, w1, w2, w3 = load4(w, (0, c))
                        w4, w5, w6, w7 = load4(w, (0, c + 4))
                        b0, b1, b2, b3 = load4(b, (0, c))
                        b4, b5, b6, b7 = load4(b, (0, c + 4))
                        store4(out, (row, 4 * (lane + 32 * k)),
                               pack_word((v[o] - m) * r * w0 + b0, (v[o + 1] - m) * r * w1 + b1),
                               pack_word((v[o + 2] - m) * r * w2 + b2, (v[o + 3] - m) * r * w3 + b3),
                               pack_word((v[o + 4] - m) * r * w4 + b4, (v[o + 5] - m) * r * w5 + b5),
                               pack_word((v[o + 6] - m) * r * w6 + b6, (v[o + 7] - m) * r * w7 + b7))
                    if lane == 0:
                        mean[row] = m
                        rstd[row] = r

    return kernel


@cuda.jit(device=True, inline=True)
def _unpack4(dst, o, u0, u1, u2, u3):
    """dst[o .. o + 7] = the eight bf16 values of four words."""
    dst[o], dst[o + 1], dst[o + 2], dst[o + 3] = word_lo(u0), word_hi(u0), word_lo(u1), word_hi(u1)
    dst[o + 4], dst[o + 5], dst[o + 6], dst[o + 7] = word_lo(u2), word_hi(u2), word_lo(u3), word_hi(u3)


@functools.lru_cache(maxsize=None)
def _backward_kernel(G: int):
    K = 8 * G  # columns a lane
    C3 = 3 * 256 * G  # the block's dw, db and dsum partial sums
    BUF = 32 * WARPS

    @cuda.jit(cache=True)
    def kernel(dx, dsum, dw, db, dout, x, w, mean, rstd):
        """dx, dout, x (N, C / 2) uint32 words of bf16 pairs; dx += LayerNorm's backward of dout, in place;
        dw, db (C,) += the column sums of dout * xhat and dout; dsum (C,), unless empty, += the new dx's.
        w (1, C) float32. Warp j takes row base + j of each block-uniform turn."""
        N = x.shape[0]
        C = 2 * x.shape[1]
        total = dsum.shape[0] > 0
        buf = cuda.shared.array(BUF, float32)
        sums = cuda.shared.array(C3, float32)
        lane, warp = cuda.threadIdx.x % 32, cuda.threadIdx.x // 32
        wr = cuda.local.array(K, float32)
        xv = cuda.local.array(K, float32)
        gv = cuda.local.array(K, float32)
        dv = cuda.local.array(K, float32)
        aw = cuda.local.array(K, float32)
        ab = cuda.local.array(K, float32)
        asum = cuda.local.array(K, float32)
        for k in range(G):
            c = 8 * (lane + 32 * k)
            wr[8 * k], wr[8 * k + 1], wr[8 * k + 2], wr[8 * k + 3] = load4(w, (0, c))
            wr[8 * k + 4], wr[8 * k + 5], wr[8 * k + 6], wr[8 * k + 7] = load4(w, (0, c + 4))
        for i in range(K):
            aw[i] = float32(0.0)
            ab[i] = float32(0.0)
            asum[i] = float32(0.0)
        for base in range(cuda.blockIdx.x * WARPS, N, cuda.gridDim.x * WARPS):
            row = base + warp
            live = row < N
            for k in range(G):
                u0 = u1 = u2 = u3 = g0 = g1 = g2 = g3 = d0 = d1 = d2 = d3 = uint32(0)
                if live:
                    j = (row, 4 * (lane + 32 * k))
                    u0, u1, u2, u3 = load4(x, j)
                    g0, g1, g2, g3 = load4(dout, j)
                    d0, d1, d2, d3 = load4(dx, j)
                _unpack4(xv, 8 * k, u0, u1, u2, u3)
                _unpack4(gv, 8 * k, g0, g1, g2, g3)
                _unpack4(dv, 8 * k, d0, d1, d2, d3)
            m = mean[row] if live else float32(0.0)
            r = rstd[row] if live else float32(0.0)
            a = float32(0.0)
            bs = float32(0.0)
            for i in range(K):  # a dead row's dout is 0: it adds nothing
                n = (xv[i] - m) * r
                xv[i] = n
                dn = gv[i] * wr[i]
                a += dn
                bs += dn * n
                aw[i] += gv[i] * n
                ab[i] += gv[i]
            a = warp_sum(a, buf) / float32(C)
            bs = warp_sum(bs, buf) / float32(C)
            if live:
                for i in range(K):  # += : dx also carries the residual path
                    dv[i] += r * (gv[i] * wr[i] - a - xv[i] * bs)
                    asum[i] += dv[i]
                for k in range(G):
                    o = 8 * k
                    store4(dx, (row, 4 * (lane + 32 * k)), pack_word(dv[o], dv[o + 1]), pack_word(dv[o + 2], dv[o + 3]),
                           pack_word(dv[o + 4], dv[o + 5]), pack_word(dv[o + 6], dv[o + 7]))
        # the block's sums: the warps add theirs into shared memory in turn, then one vector add a thread
        for i in range(cuda.threadIdx.x, C3, cuda.blockDim.x):
            sums[i] = float32(0.0)
        cuda.syncthreads()
        for turn in range(WARPS):
            if warp == turn:
                for k in range(G):
                    for e in range(8):
                        c = 8 * (lane + 32 * k) + e
                        sums[c] += aw[8 * k + e]
                        sums[C + c] += ab[8 * k + e]
                        sums[2 * C + c] += asum[8 * k + e]
            cuda.syncthreads()
        for i in range(4 * cuda.threadIdx.x, 3 * C, 4 * cuda.blockDim.x):
            part, c = i // C, i % C
            if part == 0:
                red_add4(dw, c, sums[i], sums[i + 1], sums[i + 2], sums[i + 3])
            elif part == 1:
                red_add4(db, c, sums[i], sums[i + 1], sums[i + 2], sums[i + 3])
            elif total:
                red_add4(dsum, c, sums[i], sums[i + 1], sums[i + 2], sums[i + 3])

    return kernel


def forward(out, mean, rstd, x, w, b, stream=0, eps=1e-5, blocks=None, rows=FORWARD_ROWS) -> None:
    """layernorm_forward on bf16 x and out (fits); blocks: the grid (default FORWARD_BLOCKS at most);
    rows: a warp's rows in flight."""
    N, C = x.shape
    grid = min(blocks or FORWARD_BLOCKS, -(-N // (WARPS * rows)))
    _forward_kernel(C // 256, rows)[grid, 32 * WARPS, stream](
        out.view(np.uint32), mean, rstd, x.view(np.uint32), w.reshape(1, C), b.reshape(1, C), np.float32(eps))


def backward(dx, dw, db, dout, x, w, mean, rstd, stream=0, dsum=None, blocks=None) -> None:
    """layernorm_backward with dx, dout and x bf16 (fits), dx updated in place; blocks: the grid
    (default BACKWARD_BLOCKS at most)."""
    N, C = x.shape
    if dsum is None:
        dsum = koifish_cuda.compat.device_constant((0,), np.float32)
    grid = min(blocks or BACKWARD_BLOCKS, -(-N // WARPS))
    _backward_kernel(C // 256)[grid, 32 * WARPS, stream](dx.view(np.uint32), dsum, dw, db, dout.view(np.uint32),
                                                         x.view(np.uint32), w.reshape(1, C), mean, rstd)
