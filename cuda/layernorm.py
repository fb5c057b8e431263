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
# The forward: a warp per row, the row held in the lanes' registers (PER = ceil(C / 32) values a
# lane, a compile-time constant of each kernel, so the loops unroll and the arrays stay in
# registers): one read of x, shuffle reductions, no block barriers (55% of copy bandwidth at
# C=768, against 46% for a warp that read the row three times).
import functools  # noqa: E402
import math  # noqa: E402


import koifish_cuda.compat  # noqa: E402,F401
from koifish_cuda.bf16 import load, load_4, store, store_4  # noqa: E402
from koifish_cuda.reduce import THREADS, WARPS, warp_sum  # noqa: E402
from koifish_cuda.vload import load4  # noqa: E402
from numba import cuda, float32  # noqa: E402


ROWS = 8  # warps (rows in flight) per block
BUF = 32 * ROWS  # a compile-time constant for the shared array of the simulator's warp reductions
# rows the backward's block has in flight: bench_kernels --sweep on an H200 at N=16384 gave one row
# 0.142 ms (C=768) and 0.296 ms (C=1600), two rows 0.150 and 0.549 (the wider row's registers spill)
BACK_ROWS = 1
MAX_C = 32 * 64  # widest row: 64 values a lane (GPT-2 1558M has C = 1600)
BACKWARD_BLOCKS = 528  # the backward's grid (4 blocks an SM of an H100/H200)


@functools.lru_cache(maxsize=None)
def _forward_kernel(PER: int):
    @cuda.jit(cache=True)  # cached on disk per value of its constants (the closure's cells are in the key)
    def kernel(out, mean, rstd, x, w, b, eps):
        """out (N, C) = LayerNorm of x (N, C), each float32 or bf16 bits; mean and rstd kept (float32)."""
        N, C = x.shape
        buf = cuda.shared.array(BUF, float32)
        lane = cuda.threadIdx.x % 32
        v = cuda.local.array(PER, float32)
        # grid-stride over groups of ROWS rows (the block's warps take the same turns: the
        # simulator's warp sums are block-wide)
        for base in range(cuda.blockIdx.x * ROWS, N, cuda.gridDim.x * ROWS):
            row = base + cuda.threadIdx.x // 32
            live = row < N
            s = float32(0.0)
            for k in range(PER):
                c = lane + 32 * k
                v[k] = load(x, (row, c)) if live and c < C else float32(0.0)
                s += v[k]
            m = warp_sum(s, buf) / float32(C)  # float32(C): an int divisor would make m, and all after it, float64
            s = float32(0.0)
            for k in range(PER):
                d = v[k] - m if lane + 32 * k < C else float32(0.0)
                s += d * d
            r = float32(1.0) / math.sqrt(warp_sum(s, buf) / float32(C) + eps)
            if live:
                for k in range(PER):
                    c = lane + 32 * k
                    if c < C:
                        store(out, (row, c), (v[k] - m) * r * w[c] + b[c])
                if lane == 0:
                    mean[row] = m
                    rstd[row] = r

    return kernel


@functools.lru_cache(maxsize=None)
def _forward4_kernel(PER4: int):
    PER = 4 * PER4

    @cuda.jit(cache=True)
    def kernel(out, mean, rstd, x, w, b, eps):
        """The forward for C a multiple of 4, every array aligned to four elements: lane l owns columns
        4 (l + 32 k) + e, e < 4, read in one 16-byte load and written in one store each (vload.py):
        a quarter of the scalar kernel's memory instructions."""
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
                    v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3] = load_4(x, (row, c))
                else:
                    for e in range(4):
                        v[4 * k + e] = float32(0.0)
                s += (v[4 * k] + v[4 * k + 1]) + (v[4 * k + 2] + v[4 * k + 3])
            m = warp_sum(s, buf) / float32(C)
            s = float32(0.0)
            for k in range(PER4):
                if 4 * (lane + 32 * k) < C:
                    for e in range(4):
                        d = v[4 * k + e] - m
                        s += d * d
            r = float32(1.0) / math.sqrt(warp_sum(s, buf) / float32(C) + eps)
            if live:
                for k in range(PER4):
                    c = 4 * (lane + 32 * k)
                    if c < C:
                        w0, w1, w2, w3 = load4(w, c)
                        b0, b1, b2, b3 = load4(b, c)
                        store_4(out, (row, c), (v[4 * k] - m) * r * w0 + b0, (v[4 * k + 1] - m) * r * w1 + b1,
                                (v[4 * k + 2] - m) * r * w2 + b2, (v[4 * k + 3] - m) * r * w3 + b3)
                if lane == 0:
                    mean[row] = m
                    rstd[row] = r

    return kernel


def _aligned(a, elements: int) -> bool:
    """a's first element sits on a boundary of `elements` of its items (vector loads need it)."""
    iface = getattr(a, "__cuda_array_interface__", None)
    ptr = iface["data"][0] if iface else a.ctypes.data
    return ptr % (elements * a.dtype.itemsize) == 0


@functools.lru_cache(maxsize=None)
def _backward_kernel(PER: int, BACK_ROWS: int = BACK_ROWS):
    PR = PER * BACK_ROWS  # a local array's size must be a plain constant, not an expression
    RED = 2 * WARPS * BACK_ROWS  # the rows' per-warp sums

    @cuda.jit(cache=True)
    def kernel(dx, dx16, dsum, dw, db, dout, x, w, mean, rstd):
        """A block walks rows, BACK_ROWS at a time (grid-stride); thread t owns columns t + THREADS k,
        k < PER (a compile-time constant, so every per-column array below is registers): its
        weights, the rows' normalised x, dout and old dx, read together in the first pass, and its
        dw/db (and dsum) partial sums, added into dw/db once per block, not once per row. The rows'
        sums are reduced in each warp by shuffles and across the warps through shared memory: two
        barriers for BACK_ROWS rows. The kernel is bound by latency, not bytes (float32 and bf16
        dout ran alike): reading everything a row needs at once is what helps (more rows in
        flight did not, see BACK_ROWS). dx16, unless it has no rows, gets a bf16 copy of the new dx (the bf16 GEMMs'
        operand); dsum, unless empty, += the new dx's column sums (the residual gradient's: the
        bias gradient of the projection added at that residual, for free). A warp per row with
        the row in registers, as the forward, was slower: 248 registers a thread, 0.36 ms at
        16384 x 768; bounded to 128, 0.26 ms."""
        N, C = x.shape
        copy = dx16.shape[0] > 0
        total = dsum.shape[0] > 0
        buf = cuda.shared.array(THREADS, float32)
        red = cuda.shared.array(RED, float32)
        t = cuda.threadIdx.x
        lane, warp = t % 32, t // 32
        wr = cuda.local.array(PER, float32)
        acc_w = cuda.local.array(PER, float32)
        acc_b = cuda.local.array(PER, float32)
        acc_s = cuda.local.array(PER, float32)
        nr = cuda.local.array(PR, float32)  # per row q: [q * PER + k]
        gr = cuda.local.array(PR, float32)
        dr = cuda.local.array(PR, float32)
        rs = cuda.local.array(BACK_ROWS, float32)
        for k in range(PER):
            c = t + k * THREADS
            wr[k] = w[c] if c < C else float32(0.0)
            acc_w[k] = float32(0.0)
            acc_b[k] = float32(0.0)
            acc_s[k] = float32(0.0)
        for base in range(cuda.blockIdx.x * BACK_ROWS, N, cuda.gridDim.x * BACK_ROWS):
            for q in range(BACK_ROWS):
                row = base + q
                live = row < N
                m = mean[row] if live else float32(0.0)
                r = rstd[row] if live else float32(0.0)
                rs[q] = r
                a = float32(0.0)
                bs = float32(0.0)
                for k in range(PER):
                    c = t + k * THREADS
                    if live and c < C:
                        n = (load(x, (row, c)) - m) * r
                        g = load(dout, (row, c))
                        nr[q * PER + k] = n
                        gr[q * PER + k] = g
                        dr[q * PER + k] = dx[row, c]
                        dn = g * wr[k]
                        a += dn
                        bs += dn * n
                        acc_w[k] += g * n
                        acc_b[k] += g
                a = warp_sum(a, buf)
                bs = warp_sum(bs, buf)
                if lane == 0:
                    red[2 * WARPS * q + warp] = a
                    red[2 * WARPS * q + WARPS + warp] = bs
            cuda.syncthreads()
            for q in range(BACK_ROWS):
                row = base + q
                a = float32(0.0)
                bs = float32(0.0)
                for i in range(WARPS):
                    a += red[2 * WARPS * q + i]
                    bs += red[2 * WARPS * q + WARPS + i]
                a /= float32(C)
                bs /= float32(C)
                r = rs[q]
                if row < N:
                    for k in range(PER):
                        c = t + k * THREADS
                        if c < C:
                            # += : dx also carries the residual path
                            v = dr[q * PER + k] + r * (gr[q * PER + k] * wr[k] - a - nr[q * PER + k] * bs)
                            dx[row, c] = v
                            acc_s[k] += v
                            if copy:
                                store(dx16, (row, c), v)
            cuda.syncthreads()  # every thread has its sums before the next rows' overwrite them
        for k in range(PER):
            c = t + k * THREADS
            if c < C:
                cuda.atomic.add(dw, c, acc_w[k])
                cuda.atomic.add(db, c, acc_b[k])
                if total:
                    cuda.atomic.add(dsum, c, acc_s[k])

    return kernel


def _per(C: int) -> int:
    if C > MAX_C:
        raise ValueError(f"layernorm supports widths up to {MAX_C}, got {C}")
    return -(-C // 32)


def layernorm_forward(out, mean, rstd, x, w, b, stream=0, eps=EPS, blocks=None, vector=True):
    """blocks: the grid (default a block for every ROWS rows; fewer walk the rows grid-stride, to be
    measured with bench_kernels.py --sweep). vector: four columns a memory instruction where the
    width and alignment allow it (else, or with vector=False, one)."""
    C = x.shape[1]
    if vector and C % 4 == 0 and all(_aligned(a, 4) for a in (x, out, w, b)):
        kernel = _forward4_kernel(-(-_per(C) // 4))
    else:
        kernel = _forward_kernel(_per(C))
    grid = -(-x.shape[0] // ROWS)
    # np.float32: a Python float is typed float64 and drags the row's arithmetic into float64
    kernel[min(blocks or grid, grid), 32 * ROWS, stream](out, mean, rstd, x, w, b, np.float32(eps))


def layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, stream=0, blocks=None, dx16=None, dsum=None,
                       rows=BACK_ROWS):
    """Adds into dx, dw and db; dout float32 or bf16 bits. dx16 (bf16 bits, dx's shape), if given,
    receives a copy of the new dx; dsum (C,) float32, if given, += the new dx's column sums.
    blocks (the grid) and rows (a block's rows in flight) are there to be measured
    (bench_kernels.py --sweep); a warp per row with shared-memory dw/db sums was measured 3x
    slower (0.237 against 0.079 ms at 8192 x 768, H200) and is gone."""
    N, C = x.shape
    if C > MAX_C:
        raise ValueError(f"layernorm_backward supports widths up to {MAX_C}, got {C}")
    if dx16 is None:  # no rows: no bf16 copy of dx
        dx16 = koifish_cuda.compat.device_constant((0, 1), np.uint16)
    if dsum is None:
        dsum = koifish_cuda.compat.device_constant((0,), np.float32)
    kernel = _backward_kernel(-(-C // THREADS), rows)
    grid = min(blocks or BACKWARD_BLOCKS, -(-N // rows))
    kernel[grid, THREADS, stream](dx, dx16, dsum, dw, db, dout, x, w, mean, rstd)
