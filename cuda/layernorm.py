"""LayerNorm over the last axis (biased variance, eps 1e-5, as GPT-2).

    out = (x - mean) * rstd * w + b,  rstd = 1 / sqrt(var + eps)      x (..., C) -> out (..., C)
"""

import numpy as np

EPS = 1e-5


def layernorm_forward_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = EPS):
    """Returns (out, mean, rstd); mean and rstd have shape x.shape[:-1] and feed the backward."""
    mean = x.mean(axis=-1)
    xc = x - mean[..., None]
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1) + eps)
    return xc * rstd[..., None] * w + b, mean, rstd


def layernorm_backward_ref(dout: np.ndarray, x: np.ndarray, w: np.ndarray, mean: np.ndarray, rstd: np.ndarray):
    """Returns (dx, dw, db)."""
    norm = (x - mean[..., None]) * rstd[..., None]
    dnorm = dout * w
    dx = rstd[..., None] * (dnorm - dnorm.mean(axis=-1, keepdims=True)
                            - norm * (dnorm * norm).mean(axis=-1, keepdims=True))
    axes = tuple(range(dout.ndim - 1))
    return dx, (dout * norm).sum(axis=axes), dout.sum(axis=axes)


# ---- CUDA ------------------------------------------------------------------------------------
# Both kernels hold a row in registers and take its columns in groups of four: column 4 (i + S k) + e,
# e < 4, belongs to thread (or lane) i of S, for k below a compile-time constant (so the loops
# unroll and the arrays stay in registers). Where C is a multiple of 4 and every array starts on a
# four-element boundary, a group is one memory instruction (vload.py: 16 bytes of float32, 8 of
# bf16); else four scalar ones, bounds-checked column by column. On an H200 at 16384 x 768 the
# forward took 0.025 ms with vectors (111% of the copy rate measured beside it) and 0.089 ms with
# the scalar loads of a column per lane (31%): the kernels ran out of memory instructions in
# flight, not bandwidth.
import functools  # noqa: E402
import math  # noqa: E402


import koifish_cuda.compat  # noqa: E402,F401
from koifish_cuda import layernorm_bf16  # noqa: E402
from koifish_cuda.bf16 import load, load_4, store, store_4  # noqa: E402
from koifish_cuda.reduce import THREADS, warp_sum  # noqa: E402
from koifish_cuda.vload import aligned  # noqa: E402
from numba import cuda, float32  # noqa: E402


ROWS = 8  # warps (rows in flight) per block of the forward
BUF = 32 * ROWS  # a compile-time constant for the shared array of the simulator's warp reductions
# rows the backward's block has in flight: bench_kernels --sweep on an H200 at N=16384 gave one row
# 0.142 ms (C=768) and 0.296 ms (C=1600), two rows 0.150 and 0.549 (the wider row's registers spill)
BACK_ROWS = 1
MAX_C = 32 * 64  # widest row: 64 values a lane (GPT-2 1558M has C = 1600)
BACKWARD_BLOCKS = 528  # the backward's grid (4 blocks an SM of an H100/H200)
# the forward's grid at most (8 blocks an SM), the rows past it walked grid-stride: at 16384 x 768 on the
# H200 0.0357 / 0.0384 ms with a block for every ROWS rows (2048) against 0.0317 / 0.0339 with 1056, in two
# runs (bench_kernels --sweep, stop 18; results/kernels_sweep_s18*.json); at C = 1600 the same either way
FORWARD_BLOCKS = 1056


@cuda.jit(device=True, inline=True)
def _load_group(a, row, c, C, vec):
    """a[row, c : c + 4] as float32 (0 past the row's end); vec: one vector load (C % 4 == 0, aligned)."""
    if vec:
        return load_4(a, (row, c))
    z = float32(0.0)
    return (load(a, (row, c)) if c < C else z, load(a, (row, c + 1)) if c + 1 < C else z,
            load(a, (row, c + 2)) if c + 2 < C else z, load(a, (row, c + 3)) if c + 3 < C else z)


@cuda.jit(device=True, inline=True)
def _store_group(a, row, c, C, vec, v0, v1, v2, v3):
    """a[row, c : c + 4] = v0..v3 (the columns inside the row); vec as _load_group."""
    if vec:
        store_4(a, (row, c), v0, v1, v2, v3)
    else:
        store(a, (row, c), v0)
        if c + 1 < C:
            store(a, (row, c + 1), v1)
        if c + 2 < C:
            store(a, (row, c + 2), v2)
        if c + 3 < C:
            store(a, (row, c + 3), v3)


@functools.lru_cache(maxsize=None)
def _forward_kernel(PER4: int, VEC: bool):
    PER = 4 * PER4  # a local array's size must be a plain constant, not an expression

    @cuda.jit(cache=True)  # cached on disk per value of its constants (the closure's cells are in the key)
    def kernel(out, mean, rstd, x, w, b, eps):
        """out (N, C) = LayerNorm of x (N, C), each float32 or bf16 bits; w and b (1, C); mean and
        rstd kept (float32). A warp per row, lane l owning the groups l + 32 k: one read of x, shuffle
        reductions, no block barriers; grid-stride over groups of ROWS rows (the block's warps take
        the same turns: the simulator's warp sums are block-wide)."""
        N, C = x.shape
        buf = cuda.shared.array(BUF, float32)
        lane = cuda.threadIdx.x % 32
        v = cuda.local.array(PER, float32)
        for base in range(cuda.blockIdx.x * ROWS, N, cuda.gridDim.x * ROWS):
            row = base + cuda.threadIdx.x // 32
            live = row < N
            s = float32(0.0)
            for k in range(PER4):
                c = 4 * (lane + 32 * k)
                if live and c < C:
                    v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3] = _load_group(x, row, c, C, VEC)
                else:
                    for e in range(4):
                        v[4 * k + e] = float32(0.0)
                s += (v[4 * k] + v[4 * k + 1]) + (v[4 * k + 2] + v[4 * k + 3])
            m = warp_sum(s, buf) / float32(C)  # float32(C): an int divisor would make m, and all after it, float64
            s = float32(0.0)
            for k in range(PER4):
                for e in range(4):
                    if 4 * (lane + 32 * k) + e < C:
                        d = v[4 * k + e] - m
                        s += d * d
            r = float32(1.0) / math.sqrt(warp_sum(s, buf) / float32(C) + eps)
            if live:
                for k in range(PER4):
                    c = 4 * (lane + 32 * k)
                    if c < C:
                        w0, w1, w2, w3 = _load_group(w, 0, c, C, VEC)
                        b0, b1, b2, b3 = _load_group(b, 0, c, C, VEC)
                        _store_group(out, row, c, C, VEC, (v[4 * k] - m) * r * w0 + b0,
                                     (v[4 * k + 1] - m) * r * w1 + b1, (v[4 * k + 2] - m) * r * w2 + b2,
                                     (v[4 * k + 3] - m) * r * w3 + b3)
                if lane == 0:
                    mean[row] = m
                    rstd[row] = r

    return kernel


@functools.lru_cache(maxsize=None)
def _backward_kernel(PER4: int, BACK_ROWS: int, VEC: bool, NT: int = THREADS):
    PER = 4 * PER4  # a local array's size must be a plain constant, not an expression
    PR = PER * BACK_ROWS
    NW = NT // 32  # warps a block
    RED = 2 * NW * BACK_ROWS  # the rows' per-warp sums

    @cuda.jit(cache=True)
    def kernel(dx, dx16, dsum, dw, db, dout, x, w, mean, rstd):
        """w (1, C). A block walks rows, BACK_ROWS at a time (grid-stride); thread t owns the groups t + NT
        k: its weights, the rows' normalised x, dout and old dx, read together in the first pass, and
        its dw/db (and dsum) partial sums, added into dw/db once per block, not once per row. The
        rows' sums are reduced in each warp by shuffles and across the warps through shared memory:
        two barriers for BACK_ROWS rows. dx16, unless it has no rows, gets a bf16 copy of the new dx
        (the bf16 GEMMs' operand); dsum, unless empty, += the new dx's column sums (the residual
        gradient's: the bias gradient of the projection added at that residual, for free). A warp
        per row with shared-memory dw/db sums was 3x slower (0.237 against 0.079 ms at 8192 x 768,
        H200); a warp per row with the row in registers, as the forward, took 248 registers a
        thread (0.36 ms at 16384 x 768; bounded to 128, 0.26 ms)."""
        N, C = x.shape
        copy = dx16.shape[0] > 0
        total = dsum.shape[0] > 0
        buf = cuda.shared.array(NT, float32)
        red = cuda.shared.array(RED, float32)
        t = cuda.threadIdx.x
        lane, warp = t % 32, t // 32
        wr = cuda.local.array(PER, float32)
        acc_w = cuda.local.array(PER, float32)
        acc_b = cuda.local.array(PER, float32)
        acc_s = cuda.local.array(PER, float32)
        nr = cuda.local.array(PR, float32)  # per row q: [q * PER + i]
        gr = cuda.local.array(PR, float32)
        dr = cuda.local.array(PR, float32)
        rs = cuda.local.array(BACK_ROWS, float32)
        for k in range(PER4):
            c = 4 * (t + k * NT)
            if c < C:
                wr[4 * k], wr[4 * k + 1], wr[4 * k + 2], wr[4 * k + 3] = _load_group(w, 0, c, C, VEC)
            else:
                for e in range(4):
                    wr[4 * k + e] = float32(0.0)
        for i in range(PER):
            acc_w[i] = float32(0.0)
            acc_b[i] = float32(0.0)
            acc_s[i] = float32(0.0)
        for base in range(cuda.blockIdx.x * BACK_ROWS, N, cuda.gridDim.x * BACK_ROWS):
            for q in range(BACK_ROWS):
                row = base + q
                live = row < N
                m = mean[row] if live else float32(0.0)
                r = rstd[row] if live else float32(0.0)
                rs[q] = r
                a = float32(0.0)
                bs = float32(0.0)
                for k in range(PER4):
                    c = 4 * (t + k * NT)
                    if live and c < C:
                        o = q * PER + 4 * k
                        x0, x1, x2, x3 = _load_group(x, row, c, C, VEC)
                        gr[o], gr[o + 1], gr[o + 2], gr[o + 3] = _load_group(dout, row, c, C, VEC)
                        dr[o], dr[o + 1], dr[o + 2], dr[o + 3] = _load_group(dx, row, c, C, VEC)
                        nr[o], nr[o + 1], nr[o + 2], nr[o + 3] = (x0 - m) * r, (x1 - m) * r, (x2 - m) * r, (x3 - m) * r
                        for e in range(4):  # columns past C hold 0 in gr and wr: they add nothing
                            dn = gr[o + e] * wr[4 * k + e]
                            a += dn
                            bs += dn * nr[o + e]
                            acc_w[4 * k + e] += gr[o + e] * nr[o + e]
                            acc_b[4 * k + e] += gr[o + e]
                a = warp_sum(a, buf)
                bs = warp_sum(bs, buf)
                if lane == 0:
                    red[2 * NW * q + warp] = a
                    red[2 * NW * q + NW + warp] = bs
            cuda.syncthreads()
            for q in range(BACK_ROWS):
                row = base + q
                a = float32(0.0)
                bs = float32(0.0)
                for i in range(NW):
                    a += red[2 * NW * q + i]
                    bs += red[2 * NW * q + NW + i]
                a /= float32(C)
                bs /= float32(C)
                r = rs[q]
                if row < N:
                    for k in range(PER4):
                        c = 4 * (t + k * NT)
                        if c < C:
                            o = q * PER + 4 * k
                            # += : dx also carries the residual path
                            v0 = dr[o] + r * (gr[o] * wr[4 * k] - a - nr[o] * bs)
                            v1 = dr[o + 1] + r * (gr[o + 1] * wr[4 * k + 1] - a - nr[o + 1] * bs)
                            v2 = dr[o + 2] + r * (gr[o + 2] * wr[4 * k + 2] - a - nr[o + 2] * bs)
                            v3 = dr[o + 3] + r * (gr[o + 3] * wr[4 * k + 3] - a - nr[o + 3] * bs)
                            _store_group(dx, row, c, C, VEC, v0, v1, v2, v3)
                            if copy:
                                _store_group(dx16, row, c, C, VEC, v0, v1, v2, v3)
                            acc_s[4 * k] += v0
                            acc_s[4 * k + 1] += v1
                            acc_s[4 * k + 2] += v2
                            acc_s[4 * k + 3] += v3
            cuda.syncthreads()  # every thread has its sums before the next rows' overwrite them
        for k in range(PER4):
            for e in range(4):
                c = 4 * (t + k * NT) + e
                if c < C:
                    cuda.atomic.add(dw, c, acc_w[4 * k + e])
                    cuda.atomic.add(db, c, acc_b[4 * k + e])
                    if total:
                        cuda.atomic.add(dsum, c, acc_s[4 * k + e])

    return kernel


def _vector(C: int, arrays, vector: bool) -> bool:
    """Groups of four columns in one memory instruction: C a multiple of 4, every array aligned."""
    if C > MAX_C:
        raise ValueError(f"layernorm supports widths up to {MAX_C}, got {C}")
    return vector and C % 4 == 0 and all(a.size == 0 or aligned(a, 4) for a in arrays)


def layernorm_forward(out, mean, rstd, x, w, b, stream=0, eps=EPS, blocks=None, vector=True, wide=True):
    """blocks: the grid (default a block for every ROWS rows up to FORWARD_BLOCKS; fewer walk the rows
    grid-stride; bench_kernels.py --sweep). vector=False: scalar loads even where vectors would do.
    wide: x and out bf16 of a width layernorm_bf16 takes go to its warp-per-row kernel (False: this
    file's, to measure one against the other)."""
    C = x.shape[1]
    if wide and vector and layernorm_bf16.fits(C, (out, x), (w, b)):
        return layernorm_bf16.forward(out, mean, rstd, x, w, b, stream, eps, blocks)
    kernel = _forward_kernel(-(-C // 128), _vector(C, (out, x, w, b), vector))
    grid = -(-x.shape[0] // ROWS)
    # np.float32: a Python float is typed float64 and drags the row's arithmetic into float64
    kernel[min(blocks or FORWARD_BLOCKS, grid), 32 * ROWS, stream](out, mean, rstd, x, w.reshape(1, C),
                                                                   b.reshape(1, C), np.float32(eps))


def layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, stream=0, blocks=None, dx16=None, dsum=None,
                       rows=BACK_ROWS, vector=True, fit=True, wide=True):
    """Adds into dx, dw and db; dout float32 or bf16 bits. dx16 (bf16 bits, dx's shape), if given,
    receives a copy of the new dx; dsum (C,) float32, if given, += the new dx's column sums.
    blocks (the grid) and rows (a block's rows in flight) are there to be measured
    (bench_kernels.py --sweep); vector as layernorm_forward's. fit: a block of C/4 threads rounded up to
    whole warps (192 at C = 768, 416 at 1600: a group of four columns each), not THREADS (128: one or two
    groups at 768, the threads past the row idle half the time): at 16384 rows on the H200, 0.098 -> 0.080
    ms at C = 768 (74% -> 91% of copy), 0.218 -> 0.145 at 1600 (70% -> 104%; bench_kernels --sweep, stop 18).
    wide: dx, dout and x bf16 (no dx16) of a width layernorm_bf16 takes go to its warp-per-row kernel."""
    N, C = x.shape
    if wide and vector and dx16 is None and layernorm_bf16.fits(C, (dx, dout, x), (w, dw, db, dsum)):
        return layernorm_bf16.backward(dx, dw, db, dout, x, w, mean, rstd, stream, dsum, blocks)
    if dx16 is None:  # no rows: no bf16 copy of dx
        dx16 = koifish_cuda.compat.device_constant((0, 1), np.uint16)
    if dsum is None:
        dsum = koifish_cuda.compat.device_constant((0,), np.float32)
    nt = min(1024, 32 * -(-C // 128)) if fit else THREADS
    kernel = _backward_kernel(-(-C // (4 * nt)), rows, _vector(C, (dx, dx16, dout, x, w), vector), nt)
    grid = min(blocks or BACKWARD_BLOCKS, -(-N // rows))
    kernel[grid, nt, stream](dx, dx16, dsum, dw, db, dout, x, w.reshape(1, C), mean, rstd)
