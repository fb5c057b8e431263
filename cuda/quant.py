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

import functools

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
from koifish_cuda.pdl import aware, begin  # noqa: E402
from koifish_cuda.compat import nb  # noqa: E402
from koifish_cuda.bf16 import as_float as _as_float, f32_to_bf16, pack_bits  # noqa: E402
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


@aware
@cuda.jit(cache=True)
def dequant_matvec_kernel(out, x, words, scales, zeros, bits, group_size):
    """out (M, N) = x (M, K) @ dequant(W).T; one block per output row n, M <= MAX_BATCH.

    Every weight is read once for all M rows of x: decode is bound by reading the weights.
    """
    begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
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


# The batch-1, 4-bit decode kernel. The packed rows are read as uint64 (16 codes; K % 32 == 0
# makes a row a whole number of them), and a code becomes a float without a conversion
# instruction (I2F runs at a quarter of the FMA rate): OR-ing code << 19 into the bits of 1.0f
# gives exactly 1 + code/16, so sum_j (1 + c_j/16) x_j = xsum + (sum_j c_j x_j) / 16.
ROWS4 = 16  # rows of W per block
WARPS4 = 4  # warps per block; they split K between them
BUF4 = 32 * WARPS4  # compile-time constants for the shared arrays
RED4 = ROWS4 * WARPS4

from numba import config, int32, uint32, uint64  # noqa: E402


@cuda.jit(device=True, inline=True)
def _dot16(q, xr):
    """sum_j (1 + code_j/16) * xr[j] over the 16 codes of the uint64 q (3 instructions a code)."""
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


@cuda.jit(device=True, inline=True)
def _block_rows(acc, rows, n0, N, R):
    """A batch-1 block's R rows from n0 (clamped: the extra rows are computed and dropped), their sums
    zeroed (R: the kernel's compile-time rows a block)."""
    for r in range(R):
        acc[r] = float32(0.0)
        rows[r] = min(n0 + r, N - 1)


@cuda.jit(device=True, inline=True)
def _store_rows(out, acc, buf, red, t, n0, N, R, W):
    """Each of the R rows' sum over the block's W warps (shuffles, then shared memory red), one plain
    store a row."""
    lane = t % 32
    wp = t // 32
    for r in range(R):
        tot = warp_sum(acc[r], buf)
        if lane == 0:
            red[wp * R + r] = tot
    cuda.syncthreads()
    if t < R and n0 + t < N:
        s = float32(0.0)
        for w in range(W):
            s += red[w * R + t]
        out[0, n0 + t] = s


# At most 170 registers a thread, so 3 blocks fit an SM: unbounded the compiler took 255 (2 blocks), and
# the token's GEMVs took 15.45 ms instead of 14.57 (H200). The simulator's jit takes no launch bounds.
_BOUNDS = {} if config.ENABLE_CUDASIM else {"launch_bounds": (BUF4, 3)}


@aware
@cuda.jit(cache=True, **_BOUNDS)
def dequant_matvec4_kernel(out, x, q64, scales, zeros, group_size):
    """out (1, N) = x (1, K) @ dequant(W).T. A block owns ROWS4 rows and its warps split K:
    warp w, lane l read uint64s 32 (w + WARPS4 s) + l of every row (a warp's loads of one row are
    a contiguous 256-byte line; ROWS4 of them in flight per lane); each lane loads its 16 x values
    once into registers for all ROWS4 rows. The warps' sums meet in shared memory and each row
    gets one plain store: no split-K over blocks, no atomics, no zeroing launch."""
    begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
    N = q64.shape[0]
    Kq = q64.shape[1]
    buf = cuda.shared.array(BUF4, float32)
    red = cuda.shared.array(RED4, float32)
    t = cuda.threadIdx.x
    lane = t % 32
    wp = t // 32
    n0 = cuda.blockIdx.x * ROWS4
    qpg = group_size // 16
    acc = cuda.local.array(ROWS4, float32)
    rows = cuda.local.array(ROWS4, int32)
    _block_rows(acc, rows, n0, N, ROWS4)
    wv = cuda.local.array(ROWS4, uint64)
    xr = cuda.local.array(16, float32)
    for i in range(wp * 32 + lane, Kq, BUF4):
        for r in range(ROWS4):  # the row loads first: they are what the kernel waits for
            wv[r] = q64[rows[r], i]
        xsum = float32(0.0)
        for j in range(16):
            xr[j] = x[0, i * 16 + j]
            xsum += xr[j]
        g = i // qpg
        for r in range(ROWS4):
            d = _dot16(wv[r], xr)  # xsum + sum_j c_j x_j / 16
            z = float32(zeros[rows[r], g])
            acc[r] += scales[rows[r], g] * (float32(16.0) * d - (float32(16.0) + z) * xsum)
    _store_rows(out, acc, buf, red, t, n0, N, ROWS4, WARPS4)


@cuda.jit(device=True, inline=True)
def _row(i, n0, split, n1):
    """W's row for output row i: two runs of rows, n0.. for i < split and n1.. after (gate|up bands)."""
    return n0 + i if i < split else n1 + i - split


@aware
@cuda.jit(cache=True)
def dequantize_bf16_kernel(out2, words, scales, zeros, bits, group_size, n0, k0, split, n1):
    """out2 (n, kc/2) uint32 = bf16 pairs of W's rows _row(i, ...) and columns k0:k0+kc, any bit width
    (the 3-bit path): a thread owns two adjacent columns (one 4-byte store) and walks rows."""
    begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
    n, half = out2.shape
    mask = (1 << bits) - 1
    c2 = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if c2 >= half:
        return
    k = k0 + 2 * c2
    chunk = k // 32
    j = k % 32
    g = k // group_size
    for i in range(cuda.blockIdx.y, n, cuda.gridDim.y):
        row = _row(i, n0, split, n1)
        s = scales[row, g]
        z = float32(zeros[row, g])
        lo = f32_to_bf16((float32(_code(words, row, chunk, j, bits, mask)) - z) * s)
        hi = f32_to_bf16((float32(_code(words, row, chunk, j + 1, bits, mask)) - z) * s)
        out2[i, c2] = pack_bits(lo, hi)


DEQUANT_ROWS = 4  # rows a thread of the word kernel takes per turn (measured: 4 rows, <= 1024 row blocks)
MAGIC = 0x4B000000  # the bits of 2^23: OR-ing a small integer c into them gives the float 2^23 + c exactly


@functools.lru_cache(maxsize=None)
def _dequantize_words_kernel(bits: int):
    """For bits dividing 32 (8, 4): a thread owns one packed word of one row and writes its 32/bits
    values as bf16 in 8-byte stores (the prefill's weight bands: this kernel runs at memory speed,
    the per-column one above does not). Codes become floats without I2F: (2^23 + c) - (2^23 + z)
    is c - z exactly, then one rounding by the scale, as the reference computes it."""
    CPW = 32 // bits  # codes per word
    ROWS = DEQUANT_ROWS
    STORES = CPW // 4  # uint64 stores of four bf16 each
    MASK = (1 << bits) - 1

    @aware
    @cuda.jit  # a closure over its constants: compiled once per process, not cached on disk
    def kernel(out4, words, scales, zeros, group_size, n0, w0, split, n1):
        begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
        n = out4.shape[0]
        nw = out4.shape[1] // STORES
        wi = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if wi >= nw:
            return
        w = w0 + wi
        g = (w * CPW) // group_size
        for i0 in range(cuda.blockIdx.y * ROWS, n, cuda.gridDim.y * ROWS):
            for i in range(i0, min(i0 + ROWS, n)):  # ROWS independent rows: their loads overlap
                row = _row(i, n0, split, n1)
                word = words[row, w]
                s = scales[row, g]
                zf = float32(8388608.0) + float32(zeros[row, g])
                for o in range(STORES):
                    acc = uint64(0)
                    for u in range(4):
                        c = (word >> uint32((o * 4 + u) * bits)) & uint32(MASK)
                        v = (_as_float(uint32(MAGIC) | c) - zf) * s
                        acc |= uint64(f32_to_bf16(v)) << uint64(16 * u)
                    out4[i, wi * STORES + o] = acc

    return kernel


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
        N = out.shape[1]
        dequant_matvec4_kernel[(N + ROWS4 - 1) // ROWS4, BUF4, stream](out, x, words.view(np.uint64), scales, zeros,
                                                                   group_size)
        return
    dequant_matvec_kernel[out.shape[1], THREADS, stream](out, x, words, scales, zeros, bits, group_size)


def dequantize_bf16(out, words, scales, zeros, bits: int, group_size: int, n0: int = 0, k0: int = 0, stream=0,
                    then: tuple[int, int] | None = None):
    """out (n, kc) uint16 (bf16 bits, C-contiguous) = W[n0:n0+n, k0:k0+kc]; k0 and kc multiples of 32.
    then = (split, n1): out's rows from split on are W's rows n1, n1 + 1, ... instead (one launch for a
    band of gate rows and the matching band of up rows)."""
    n, kc = out.shape
    _check(kc, bits, group_size)
    if k0 % 32:
        raise ValueError(f"dequantize_bf16: column offset {k0} is not a multiple of 32")
    split, n1 = then if then is not None else (n, 0)
    if bits == 3:
        half = kc // 2
        dequantize_bf16_kernel[((half + 127) // 128, koifish_cuda.compat.stride_blocks(n)), 128, stream](
            nb(out.view(np.uint32)), nb(words), nb(scales), nb(zeros), bits, group_size, n0, k0, split, n1)
        return
    nw = kc * bits // 32
    rows = koifish_cuda.compat.stride_blocks(-(-n // DEQUANT_ROWS), 1024)
    _dequantize_words_kernel(bits)[((nw + 127) // 128, rows), 128, stream](
        nb(out.view(np.uint64)), nb(words), nb(scales), nb(zeros), group_size, n0, k0 * bits // 32, split, n1)
