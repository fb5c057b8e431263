"""Group-wise integer weights (8, 4 and 3 bits): quantize, pack, dequantize.

A linear weight W (N, K) (out, in, as nn.Linear) is cut along K into groups of G columns.
Per (row, group), with the range widened to hold 0 (as GPTQ does, so zero is an exact code):
    scale = (max - min) / (2^b - 1)       rounded to fp16 first: the stored scale is the one used
    zero  = round(-min / scale)           an integer code in [0, 2^b - 1]
    q     = clip(round(W / scale) + zero, 0, 2^b - 1)
    W ~= (q - zero) * scale

    codes  (N, K)     uint8, one code per weight (unpacked)
    packed (N, K*b/8) uint8, codes as a little-endian bit stream per row (b = 3 packs 8 codes in 3 bytes)
    scales (N, K/G)   float16
    zeros  (N, K/G)   uint8
    g_idx  (K,)       group of each input column; None means column k is in group k // G.
GPTQ's act-order checkpoints permute the groups, hence g_idx.
"""

from __future__ import annotations

import numpy as np

SUPPORTED_BITS = (8, 4, 3)


def quantize_groupwise_ref(w: np.ndarray, bits: int, group_size: int):
    """(codes, scales, zeros) of W (N, K); K must be a multiple of group_size."""
    N, K = w.shape
    levels = (1 << bits) - 1
    g = w.astype(np.float32).reshape(N, K // group_size, group_size)  # (N, ng, G)
    lo = np.minimum(g.min(axis=-1), 0.0)
    hi = np.maximum(g.max(axis=-1), 0.0)
    scale = ((hi - lo) / levels).astype(np.float16)
    # an all-zero group, or one whose range underflows fp16: any positive scale represents it
    scale = np.where(scale > 0, scale, np.float16(2.0**-24))
    s32 = scale.astype(np.float32)
    zero = np.clip(np.rint(-lo / s32), 0, levels)
    codes = np.clip(np.rint(g / s32[..., None]) + zero[..., None], 0, levels)
    return codes.reshape(N, K).astype(np.uint8), scale, zero.astype(np.uint8)


def dequantize_groupwise_ref(codes, scales, zeros, group_size: int, g_idx=None, dtype=np.float32) -> np.ndarray:
    """W (N, K) from codes (N, K), scales and zeros (N, ng)."""
    N, K = codes.shape
    if g_idx is None:
        q = codes.reshape(N, K // group_size, group_size).astype(np.float32)
        w = (q - zeros[..., None].astype(np.float32)) * scales[..., None].astype(np.float32)
        return w.reshape(N, K).astype(dtype, copy=False)
    s = scales.astype(np.float32)[:, g_idx]  # (N, K)
    z = zeros.astype(np.float32)[:, g_idx]
    return ((codes.astype(np.float32) - z) * s).astype(dtype, copy=False)


def pack_codes_ref(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (N, K) -> (N, K*bits/8) uint8: code k occupies bits [k*b, k*b + b) of the row."""
    N, K = codes.shape
    if (K * bits) % 8:
        raise ValueError(f"{K} codes of {bits} bits do not fill whole bytes")
    bitplanes = np.unpackbits(codes.astype(np.uint8)[..., None], axis=-1, bitorder="little")[..., :bits]
    return np.packbits(bitplanes.reshape(N, K * bits), axis=-1, bitorder="little")


def unpack_codes_ref(packed: np.ndarray, bits: int, K: int) -> np.ndarray:
    N = packed.shape[0]
    if bits == 8:
        return packed[:, :K].copy()
    if bits == 4:  # byte j holds code 2j in its low nibble, 2j+1 in its high one
        return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(N, -1)[:, :K]
    bitplanes = np.unpackbits(packed, axis=-1, count=K * bits, bitorder="little").reshape(N, K, bits)
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    return (bitplanes * weights).sum(axis=-1, dtype=np.uint8)


def dequant_matmul_ref(x: np.ndarray, codes, scales, zeros, group_size: int, g_idx=None) -> np.ndarray:
    """x (M, K) @ dequant(W).T -> (M, N): what the fused dequantize + GEMV/GEMM kernels compute."""
    return x @ dequantize_groupwise_ref(codes, scales, zeros, group_size, g_idx, dtype=x.dtype).T


# ---- CUDA ------------------------------------------------------------------------------------
# On the device a packed row is read as uint32 words (the same little-endian bit stream), and
# 32 codes fill exactly `bits` words for bits in (3, 4, 8): a thread takes such a chunk whole.
# Groups are multiples of 32 codes, so a chunk sits in one group: one scale and zero per chunk.
# Scales are float32 on the device (converted once at load; 1/32 of the 4-bit weight bytes).
import koifish_cuda.compat  # noqa: E402,F401
from koifish_cuda.reduce import THREADS, block_sum, warp_sum  # noqa: E402
from numba import cuda, float32  # noqa: E402

MAX_BATCH = 8  # rows of x the decode kernel handles in one pass (decode batch 1 to 8)


@cuda.jit(device=True)
def _code(words, n, c, j, bits, mask):
    """Code j (0..31) of chunk c in row n."""
    off = j * bits
    w = c * bits + (off >> 5)
    sh = off & 31
    v = words[n, w] >> sh
    if sh + bits > 32:  # a 3-bit code straddling two words
        v |= words[n, w + 1] << (32 - sh)
    return v & mask


@cuda.jit(cache=True)
def dequant_matvec_kernel(out, x, words, scales, zeros, bits, group_size):
    """out (M, N) = x (M, K) @ dequant(W).T; one block per output row n, M <= MAX_BATCH.

    Every weight is read once for all M rows of x: decode is bound by reading the weights.
    """
    M, K = x.shape
    n, t = cuda.blockIdx.x, cuda.threadIdx.x
    buf = cuda.shared.array(THREADS, float32)
    acc = cuda.local.array(MAX_BATCH, float32)
    for m in range(MAX_BATCH):
        acc[m] = 0.0
    mask = (1 << bits) - 1
    for c in range(t, K // 32, THREADS):
        g = (c * 32) // group_size
        s = scales[n, g]
        z = float32(zeros[n, g])
        for j in range(32):
            w = (float32(_code(words, n, c, j, bits, mask)) - z) * s
            k = c * 32 + j
            for m in range(M):
                acc[m] += w * x[m, k]
    for m in range(M):
        total = block_sum(acc[m], buf)
        if t == 0:
            out[m, n] = total


WARPS4 = 8  # warps per block in the 4-bit decode kernel
BUF4 = 32 * WARPS4  # a compile-time constant for the shared array


@cuda.jit(cache=True)
def zero_kernel(a):
    i = cuda.grid(1)
    if i < a.size:
        a[i] = 0.0


@cuda.jit(device=True, inline=True)
def _nib(word, j):
    return float32((word >> (4 * j)) & 15)


@cuda.jit(cache=True)
def dequant_matvec4_kernel(out, x, words, scales, zeros, group_size):
    """The batch-1, 4-bit decode case. A warp owns 4 rows of W; lane l reads words l, l+32, ...
    of each (a warp's loads of one row are a contiguous 128-byte line), and every x value it loads
    serves the 4 rows: with one row per warp, reading x (4 bytes per 4-bit weight) from cache cost
    more than reading the weights. Sums stay in registers and end in 5 shuffles."""
    N = words.shape[0]
    K = x.shape[1]
    buf = cuda.shared.array(BUF4, float32)
    lane = cuda.threadIdx.x % 32
    n0 = (cuda.blockIdx.x * WARPS4 + cuda.threadIdx.x // 32) * 4
    # split-K: block column y sums words [y * span, (y + 1) * span) and adds its part into out
    span = (K // 8 + cuda.gridDim.y - 1) // cuda.gridDim.y
    w_begin = cuda.blockIdx.y * span
    w_end = min(K // 8, w_begin + span)
    a0 = float32(0.0)
    a1 = float32(0.0)
    a2 = float32(0.0)
    a3 = float32(0.0)
    if n0 < N:
        n1, n2, n3 = min(n0 + 1, N - 1), min(n0 + 2, N - 1), min(n0 + 3, N - 1)  # clamped: extra rows are dropped
        wpg = group_size // 8
        for w in range(w_begin + lane, w_end, 32):
            w0, w1, w2, w3 = words[n0, w], words[n1, w], words[n2, w], words[n3, w]
            k = w * 8
            d0 = float32(0.0)
            d1 = float32(0.0)
            d2 = float32(0.0)
            d3 = float32(0.0)
            xs = float32(0.0)
            for j in range(8):
                xj = x[0, k + j]
                xs += xj
                d0 += _nib(w0, j) * xj
                d1 += _nib(w1, j) * xj
                d2 += _nib(w2, j) * xj
                d3 += _nib(w3, j) * xj
            g = w // wpg
            a0 += scales[n0, g] * (d0 - float32(zeros[n0, g]) * xs)
            a1 += scales[n1, g] * (d1 - float32(zeros[n1, g]) * xs)
            a2 += scales[n2, g] * (d2 - float32(zeros[n2, g]) * xs)
            a3 += scales[n3, g] * (d3 - float32(zeros[n3, g]) * xs)
    t0 = warp_sum(a0, buf)
    t1 = warp_sum(a1, buf)
    t2 = warp_sum(a2, buf)
    t3 = warp_sum(a3, buf)
    if lane == 0:  # out was zeroed by the launcher; the K-splits add up
        if n0 < N:
            cuda.atomic.add(out, (0, n0), t0)
        if n0 + 1 < N:
            cuda.atomic.add(out, (0, n0 + 1), t1)
        if n0 + 2 < N:
            cuda.atomic.add(out, (0, n0 + 2), t2)
        if n0 + 3 < N:
            cuda.atomic.add(out, (0, n0 + 3), t3)


# ---- 4-bit batch-1 GEMV candidates (measured against each other by bench_quant_gemv --variants) ----
# Each reads the packed rows as uint64 (16 codes; K % 32 == 0 makes a row a whole number of them)
# and turns a code into a float without a conversion instruction: OR-ing code << 19 into the bits
# of 1.0f gives exactly 1 + code/16, so sum_j (1 + c_j/16) x_j = xsum + (sum_j c_j x_j) / 16.
import os  # noqa: E402

from numba import config, int32, uint32, uint64  # noqa: E402

if config.ENABLE_CUDASIM:

    def _as_float(i):
        return np.uint32(int(i) & 0xFFFFFFFF).view(np.float32)

else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def _as_float(i):
        return libdevice.int_as_float(int32(i))


@cuda.jit(device=True, inline=True)
def _dot16(q, xr):
    """sum_j (1 + code_j/16) * xr[j] over the 16 codes of the uint64 q."""
    lo = uint32(q & uint64(0xFFFFFFFF))
    hi = uint32(q >> uint64(32))
    d = float32(0.0)
    for j in range(8):
        sh = 19 - 4 * j
        m = ((lo << sh) if sh >= 0 else (lo >> -sh)) & 0x780000
        d += _as_float(m | 0x3F800000) * xr[j]
    for j in range(8):
        sh = 19 - 4 * j
        m = ((hi << sh) if sh >= 0 else (hi >> -sh)) & 0x780000
        d += _as_float(m | 0x3F800000) * xr[8 + j]
    return d


def make_gemv4_shared_x(R, V, WARPS, XT, DIRECT):
    """A warp owns R rows; lane l reads uint64s l, l+32, ... (V per row per step) of its block's
    K-span; x is staged per tile of XT values in shared memory, transposed (xs[j*Q + i] = x[16 i + j])
    so a warp's loads of one j are consecutive words. DIRECT: one K-span (grid.y = 1), plain stores;
    else split-K over grid.y with atomics into a zeroed out."""
    Q = XT // 16
    BUF = 32 * WARPS
    RV = R * V

    @cuda.jit
    def kern(out, x, q64, scales, zeros, group_size):
        N = q64.shape[0]
        Kq = q64.shape[1]
        xs = cuda.shared.array(XT, float32)
        xsum_s = cuda.shared.array(Q, float32)
        buf = cuda.shared.array(BUF, float32)
        t = cuda.threadIdx.x
        lane = t % 32
        n0 = (cuda.blockIdx.x * WARPS + t // 32) * R
        span = (Kq + cuda.gridDim.y - 1) // cuda.gridDim.y
        qb = cuda.blockIdx.y * span
        qe = min(Kq, qb + span)
        qpg = group_size // 16
        acc = cuda.local.array(R, float32)
        rows = cuda.local.array(R, int32)
        for r in range(R):
            acc[r] = float32(0.0)
            rows[r] = min(n0 + r, N - 1)
        wv = cuda.local.array(RV, uint64)
        xr = cuda.local.array(16, float32)
        for tq in range(qb, qe, Q):
            tn = min(Q, qe - tq)
            cuda.syncthreads()
            for i in range(t, tn * 16, BUF):
                xs[(i % 16) * Q + i // 16] = x[0, tq * 16 + i]
            cuda.syncthreads()
            for i in range(t, tn, BUF):
                s = float32(0.0)
                for j in range(16):
                    s += xs[j * Q + i]
                xsum_s[i] = s
            cuda.syncthreads()
            if n0 < N:
                for i0 in range(lane, tn, 32 * V):
                    for r in range(R):
                        for v in range(V):
                            wv[r * V + v] = q64[rows[r], tq + min(i0 + 32 * v, tn - 1)]
                    for v in range(V):
                        i = i0 + 32 * v
                        if i < tn:
                            for j in range(16):
                                xr[j] = xs[j * Q + i]
                            xsum = xsum_s[i]
                            g = (tq + i) // qpg
                            for r in range(R):
                                d = _dot16(wv[r * V + v], xr)
                                z = float32(zeros[rows[r], g])
                                acc[r] += scales[rows[r], g] * (float32(16.0) * d - (float32(16.0) + z) * xsum)
        for r in range(R):
            tot = warp_sum(acc[r], buf)
            if lane == 0 and n0 + r < N:
                if DIRECT:
                    out[0, n0 + r] = tot
                else:
                    cuda.atomic.add(out, (0, n0 + r), tot)

    def launch(out, x, words, scales, zeros, group_size, stream=0):
        q64 = words.view(np.uint64)
        N = out.shape[1]
        blocks = (N + R * WARPS - 1) // (R * WARPS)
        if DIRECT:
            kern[(blocks, 1), BUF, stream](out, x, q64, scales, zeros, group_size)
            return
        splits = max(1, min(q64.shape[1] // 64, -(-528 // blocks)))
        zero_kernel[(out.size + 255) // 256, 256, stream](out.reshape(-1))
        kern[(blocks, splits), BUF, stream](out, x, q64, scales, zeros, group_size)

    launch.kern = kern
    return launch


def make_gemv4_block_k(RB, WARPS):
    """A block owns RB rows and its WARPS warps split K between them (warp w, lane l read uint64s
    32 (w + WARPS s) + l); each lane loads its 16 x values once into registers for all RB rows;
    the warps' sums meet in shared memory and one plain store per row: no split-K, no zeroing."""
    BUF = 32 * WARPS
    RED = RB * WARPS

    @cuda.jit
    def kern(out, x, q64, scales, zeros, group_size):
        N = q64.shape[0]
        Kq = q64.shape[1]
        buf = cuda.shared.array(BUF, float32)
        red = cuda.shared.array(RED, float32)
        t = cuda.threadIdx.x
        lane = t % 32
        wp = t // 32
        n0 = cuda.blockIdx.x * RB
        qpg = group_size // 16
        acc = cuda.local.array(RB, float32)
        rows = cuda.local.array(RB, int32)
        for r in range(RB):
            acc[r] = float32(0.0)
            rows[r] = min(n0 + r, N - 1)
        wv = cuda.local.array(RB, uint64)
        xr = cuda.local.array(16, float32)
        for i in range(wp * 32 + lane, Kq, BUF):
            for r in range(RB):
                wv[r] = q64[rows[r], i]
            xsum = float32(0.0)
            for j in range(16):
                xr[j] = x[0, i * 16 + j]
                xsum += xr[j]
            g = i // qpg
            for r in range(RB):
                d = _dot16(wv[r], xr)
                z = float32(zeros[rows[r], g])
                acc[r] += scales[rows[r], g] * (float32(16.0) * d - (float32(16.0) + z) * xsum)
        for r in range(RB):
            tot = warp_sum(acc[r], buf)
            if lane == 0:
                red[wp * RB + r] = tot
        cuda.syncthreads()
        if t < RB and n0 + t < N:
            s = float32(0.0)
            for w in range(WARPS):
                s += red[w * RB + t]
            out[0, n0 + t] = s

    def launch(out, x, words, scales, zeros, group_size, stream=0):
        N = out.shape[1]
        kern[(N + RB - 1) // RB, BUF, stream](out, x, words.view(np.uint64), scales, zeros, group_size)

    launch.kern = kern
    return launch


def _gemv4_today(out, x, words, scales, zeros, group_size, stream=0):
    rows_per_block = 4 * WARPS4
    row_blocks = (out.shape[1] + rows_per_block - 1) // rows_per_block
    splits = max(1, min(x.shape[1] // 8 // 128, -(-528 // row_blocks)))
    zero_kernel[(out.size + 255) // 256, 256, stream](out.reshape(-1))
    dequant_matvec4_kernel[(row_blocks, splits), 32 * WARPS4, stream](out, x, words, scales, zeros, group_size)


GEMV4_VARIANTS = {
    "a_today": _gemv4_today,
    "b_sx_r4v2w8_split": make_gemv4_shared_x(4, 2, 8, 4096, False),
    "c_sx_r4v2w8_direct": make_gemv4_shared_x(4, 2, 8, 4096, True),
    "c_sx_r4v1w4_direct": make_gemv4_shared_x(4, 1, 4, 4096, True),
    "d_bk_rb16w4": make_gemv4_block_k(16, 4),
    "d_bk_rb8w8": make_gemv4_block_k(8, 8),
    "d_bk_rb16w8": make_gemv4_block_k(16, 8),
    "d_bk_rb4w8": make_gemv4_block_k(4, 8),
}
GEMV4 = os.environ.get("KOIFISH_GEMV4", "a_today")


@cuda.jit(cache=True)
def dequantize_kernel(out, words, scales, zeros, bits, group_size):
    """out (N, K) float32 = dequant(W): the scratch matrix a prefill GEMM (cuBLAS) reads."""
    N, K = out.shape
    chunks = K // 32
    mask = (1 << bits) - 1
    i = cuda.grid(1)
    if i >= N * chunks:
        return
    n, c = i // chunks, i % chunks
    g = (c * 32) // group_size
    s = scales[n, g]
    z = float32(zeros[n, g])
    for j in range(32):
        out[n, c * 32 + j] = (float32(_code(words, n, c, j, bits, mask)) - z) * s


def _check(K: int, bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS or K % 32 or group_size % 32:
        raise ValueError(f"device kernels need bits in {SUPPORTED_BITS} and K, group_size multiples of 32; "
                         f"got bits {bits}, K {K}, group_size {group_size}")


def dequant_matvec(out, x, words, scales, zeros, bits: int, group_size: int, stream=0):
    """words: the packed rows viewed as uint32 (N, K*bits/32); scales float32 (N, ng); zeros uint8."""
    M, K = x.shape
    _check(K, bits, group_size)
    if M > MAX_BATCH:
        raise ValueError(f"dequant_matvec handles up to {MAX_BATCH} rows of x; use dequantize + GEMM for {M}")
    if bits == 4 and M == 1:
        GEMV4_VARIANTS[GEMV4](out, x, words, scales, zeros, group_size, stream)
        return
    dequant_matvec_kernel[out.shape[1], THREADS, stream](out, x, words, scales, zeros, bits, group_size)


def dequantize(out, words, scales, zeros, bits: int, group_size: int, stream=0):
    N, K = out.shape
    _check(K, bits, group_size)
    total = N * (K // 32)
    dequantize_kernel[(total + THREADS - 1) // THREADS, THREADS, stream](out, words, scales, zeros, bits, group_size)
