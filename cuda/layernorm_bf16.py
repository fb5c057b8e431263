"""LayerNorm on an all-bf16 row (precision.residual and residual_grad bf16): a warp per row, 16-byte loads.

The general kernels (layernorm.py) take a row's columns four at a time, 8 bytes of bf16 a load, and the
backward walks a row per block with two barriers a row; at 16384 x 768 on an H200 they took 0.028 ms
(forward, 1.8 TB/s) and 0.063 ms (backward, 1.6 TB/s) where a copy kernel moves 3.9 TB/s
(probe_read_bandwidth, stop 20). Here a warp owns a row and lane l its columns 8 (l + 32 k) .. + 7, k < G
(C = 256 G): every load is 16 bytes (four uint32 words of bf16 pairs), the row's reductions are shuffles,
and no barrier stands between rows: 0.018 ms (2.8 TB/s) and 0.034 ms (3.0 TB/s). The backward's column
sums over the rows a warp takes stay on chip (dw and db per warp in shared memory, dsum, the new dx's, in
registers); each block adds its warps' sums once, a 16-byte red.global.add a thread. Same arithmetic as
layernorm.py's kernels (float32; the row's mean and rstd from its registers), checked against the same
references (layernorm_forward_ref, layernorm_backward_ref).
"""

from __future__ import annotations

import functools
import math

import numpy as np

import koifish_cuda.compat  # noqa: F401
from koifish_cuda.bf16 import pack_word, word_hi, word_lo
from koifish_cuda.reduce import warp_sum
from koifish_cuda.vload import aligned, load4, red_add4, store4
from numba import config, cuda, float32, uint32

WARPS = 4  # warps (rows in flight, R each) a block
FORWARD_ROWS = 2  # rows a warp of the forward loads before it reduces any
MAX_G = 4  # C up to 1024 (GPT-2 124M and 355M); wider rows hold too many registers: layernorm.py's kernels
FORWARD_BLOCKS = 1056  # the forward's grid at most (eight blocks an SM of an H100/H200), walked grid-stride
# the backward's 128-thread blocks an SM (its launch bounds; its grid is that many an SM). At 16384 x 768 on
# an H200 (bench_kernels --sweep, stop 20): two 0.038 ms, three 0.034 (145 registers), four 0.042 (127),
# five (spilling) 0.040; at 1024 three 0.041. Variants measured and dropped: every sum in registers (0.043
# ms), each warp loading its next row before working on this one (0.055), both before the indices were
# unsigned (214 registers and more).
BACKWARD_PER_SM = 3
SMS = 132  # an H100/H200's: the grids above are counted in them


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


@functools.lru_cache(maxsize=None)
def _backward_kernel(G: int, PER_SM: int):
    K = 8 * G  # columns a lane
    KW = 4 * G  # their words
    PART = 32 * K  # one warp's sums of one kind (C of them), lane-minor: column 8 (l + 32 k) + e at (8 k + e) 32 + l
    SUMS = 2 * WARPS * PART  # the warps' dw and db sums; at the end, their dsum sums
    BUF = 32 * WARPS
    bounds = {} if config.ENABLE_CUDASIM else {"launch_bounds": (32 * WARPS, PER_SM)}

    @cuda.jit(cache=True, **bounds)
    def kernel(dx, dsum, dw, db, dout, x, w, mean, rstd):
        """dx, dout, x (N, C / 2) uint32 words of bf16 pairs; dx += LayerNorm's backward of dout, in place;
        dw, db (C,) += the column sums of dout * xhat and dout; dsum (C,), unless empty, += the new dx's.
        w (1, C) float32. Warp j takes row base + j of each block-uniform turn. w and the lanes' dw/db sums
        live in shared memory, lane-minor (no bank conflicts); their dsum sums in registers. PER_SM blocks
        an SM (launch bounds)."""
        N = x.shape[0]
        C = 2 * x.shape[1]
        total = dsum.shape[0] > 0
        buf = cuda.shared.array(BUF, float32)
        sums = cuda.shared.array(SUMS, float32)
        wsh = cuda.shared.array(PART, float32)  # w, lane-minor
        t = cuda.threadIdx.x
        lane, warp = t % 32, t // 32
        # shared-memory indices unsigned: Numba adds a negative-index check to a signed one, and the checked
        # addresses of the unrolled loops stayed live in registers (214 a thread at C = 768)
        ul = uint32(lane)
        mine = uint32(2 * warp * PART) + ul  # this lane's dw sums, stride 32; its db sums PART further
        xs = cuda.local.array(KW, uint32)  # this turn's row: x, dout, dx (bf16 pairs)
        gs = cuda.local.array(KW, uint32)
        ds = cuda.local.array(KW, uint32)
        acc = cuda.local.array(K, float32)  # dsum
        for i in range(t, SUMS, cuda.blockDim.x):
            sums[i] = float32(0.0)
        for c in range(t, C, cuda.blockDim.x):
            wsh[((c // 256) * 8 + c % 8) * 32 + (c // 8) % 32] = w[0, c]
        for i in range(K):
            acc[i] = float32(0.0)
        cuda.syncthreads()
        for base in range(cuda.blockIdx.x * WARPS, N, cuda.gridDim.x * WARPS):
            row = base + warp
            live = row < N
            _load_row(xs, gs, ds, x, dout, dx, row, N, lane)
            m = mean[row] if live else float32(0.0)
            r = rstd[row] if live else float32(0.0)
            a = float32(0.0)
            bs = float32(0.0)
            for i in range(0, K, 2):  # a dead row's dout is 0: it adds nothing
                n0 = (word_lo(xs[i // 2]) - m) * r
                n1 = (word_hi(xs[i // 2]) - m) * r
                g0, g1 = word_lo(gs[i // 2]), word_hi(gs[i // 2])
                o = uint32(32 * i)
                d0, d1 = g0 * wsh[o + ul], g1 * wsh[o + uint32(32) + ul]
                a += d0 + d1
                bs += d0 * n0 + d1 * n1
                sums[mine + o] += g0 * n0
                sums[mine + o + uint32(32)] += g1 * n1
                sums[mine + o + uint32(PART)] += g0
                sums[mine + o + uint32(PART + 32)] += g1
            a = warp_sum(a, buf) / float32(C)
            bs = warp_sum(bs, buf) / float32(C)
            if live:
                for i in range(0, K, 2):  # += : dx also carries the residual path
                    n0 = (word_lo(xs[i // 2]) - m) * r
                    n1 = (word_hi(xs[i // 2]) - m) * r
                    o = uint32(32 * i)
                    v0 = word_lo(ds[i // 2]) + r * (word_lo(gs[i // 2]) * wsh[o + ul] - a - n0 * bs)
                    v1 = word_hi(ds[i // 2]) + r * (word_hi(gs[i // 2]) * wsh[o + uint32(32) + ul] - a - n1 * bs)
                    acc[i] += v0
                    acc[i + 1] += v1
                    ds[i // 2] = pack_word(v0, v1)
                for k in range(G):
                    store4(dx, (row, 4 * (lane + 32 * k)), ds[4 * k], ds[4 * k + 1], ds[4 * k + 2], ds[4 * k + 3])
        # the block's sums into dw, db (and dsum): a column's warps added here, one vector add a thread
        cuda.syncthreads()
        _add_block_sums(dw, sums, 0, C, t)
        _add_block_sums(db, sums, PART, C, t)
        if total:
            cuda.syncthreads()
            for i in range(K):
                sums[mine + uint32(32 * i)] = acc[i]
            cuda.syncthreads()
            _add_block_sums(dsum, sums, 0, C, t)

    @cuda.jit(device=True, inline=True)
    def _load_row(xs, gs, ds, x, dout, dx, row, N, lane):
        """A lane's words of row `row` of x, dout and dx (zeros past N)."""
        for k in range(G):
            for i in range(4):
                xs[4 * k + i] = uint32(0)
                gs[4 * k + i] = uint32(0)
                ds[4 * k + i] = uint32(0)
            if row < N:
                j = (row, 4 * (lane + 32 * k))
                xs[4 * k], xs[4 * k + 1], xs[4 * k + 2], xs[4 * k + 3] = load4(x, j)
                gs[4 * k], gs[4 * k + 1], gs[4 * k + 2], gs[4 * k + 3] = load4(dout, j)
                ds[4 * k], ds[4 * k + 1], ds[4 * k + 2], ds[4 * k + 3] = load4(dx, j)

    @cuda.jit(device=True, inline=True)
    def _add_block_sums(out, sums, part, C, t):
        """out[c] += the WARPS warps' sums of column c (lane-minor, `part` into each warp's 2 PART)."""
        for c in range(4 * t, C, 4 * 32 * WARPS):
            lane, k = (c // 8) % 32, c // 256
            e = c % 8  # 0 or 4
            v0 = v1 = v2 = v3 = float32(0.0)
            for q in range(WARPS):
                at = 2 * q * PART + part + (8 * k + e) * 32 + lane
                v0 += sums[at]
                v1 += sums[at + 32]
                v2 += sums[at + 64]
                v3 += sums[at + 96]
            red_add4(out, c, v0, v1, v2, v3)

    return kernel


def forward(out, mean, rstd, x, w, b, stream=0, eps=1e-5, blocks=None, rows=FORWARD_ROWS) -> None:
    """layernorm_forward on bf16 x and out (fits); blocks: the grid (default FORWARD_BLOCKS at most);
    rows: a warp's rows in flight."""
    N, C = x.shape
    grid = min(blocks or FORWARD_BLOCKS, -(-N // (WARPS * rows)))
    _forward_kernel(C // 256, rows)[grid, 32 * WARPS, stream](
        out.view(np.uint32), mean, rstd, x.view(np.uint32), w.reshape(1, C), b.reshape(1, C), np.float32(eps))


def backward(dx, dw, db, dout, x, w, mean, rstd, stream=0, dsum=None, blocks=None, per_sm=None) -> None:
    """layernorm_backward with dx, dout and x bf16 (fits), dx updated in place; per_sm: the kernel's
    launch bounds (blocks an SM); blocks: the grid (default per_sm an SM)."""
    N, C = x.shape
    if dsum is None:
        dsum = koifish_cuda.compat.device_constant((0,), np.float32)
    per_sm = per_sm or BACKWARD_PER_SM
    grid = min(blocks or per_sm * SMS, -(-N // WARPS))
    _backward_kernel(C // 256, per_sm)[grid, 32 * WARPS, stream](
        dx.view(np.uint32), dsum, dw, db, dout.view(np.uint32), x.view(np.uint32), w.reshape(1, C), mean, rstd)
