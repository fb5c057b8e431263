"""Group-wise quantization on the device: float32 W (N, K) -> the engine's packed layout, bit-exact.

The NumPy reference is koifish_cuda.quant: quantize_groupwise_ref (codes, scales, zeros) followed
by pack_codes_ref (the little-endian bit stream, here read as uint32 words). Per (row, group):
    lo, hi = min(min(w), 0), max(max(w), 0)
    scale  = fp16((hi - lo) / (2^b - 1)), and 2^-24 where that is 0 (all-zero or underflowing group)
    zero   = clip(rint(-lo / scale), 0, 2^b - 1)
    code   = clip(rint(w / scale) + zero, 0, 2^b - 1)
all in float32 (IEEE division, round-half-even), as the reference computes them. Outputs:
    words  (N, K*b/32) uint32   scales (N, K/G) float32 (the fp16 value)   zeros (N, K/G) uint8

Layout: one thread per (row, group), a block of 32 of them (one warp). The block walks its groups
in chunks of 32 columns, staged through a shared 32 x 33 tile: lane j loads column j of each of the
32 groups' chunk (128 contiguous bytes a load), then thread i reads its own group's 32 values from
the tile. A first pass finds min and max, a second makes the codes; 32 codes of b bits fill exactly
b words, which the thread writes as they fill. No reduction across threads, no shuffles: the
simulator (no shfl there) runs the same code in CI with one Python thread per group rather than
32. Weights are expected finite (NaN/inf give unspecified codes).
"""

from __future__ import annotations

import numpy as np

import koifish_cuda.compat  # noqa: F401  (before numba compiles)
from koifish_cuda.quant import SUPPORTED_BITS
from numba import config, cuda, float32, int32, uint8, uint32

PAIRS = 32  # (row, group) pairs per block: one thread each
TILE = (PAIRS, PAIRS + 1)  # a chunk of each pair's group; +1: row t and column t both avoid bank conflicts
MAGIC = float32(12582912.0)  # 1.5 * 2^23: (x + MAGIC) - MAGIC rounds |x| < 2^22 to an integer, half to even
RINT_LIMIT = float32(4.0e6)  # inputs clamped to +-4e6 first; any code beyond that clips anyway
SMALLEST_SCALE = float32(2.0**-24)  # the smallest fp16 subnormal: the scale of an all-zero group

if config.ENABLE_CUDASIM:

    def _bits_of(x):
        return int(np.float32(x).view(np.int32))

    def _float_of(i):
        return np.int32(i).view(np.float32)

else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def _bits_of(x):
        return libdevice.float_as_int(x)

    @cuda.jit(device=True, inline=True)
    def _float_of(i):
        return libdevice.int_as_float(int32(i))


def fp16_round_bits(b):
    """Bits of the float32 holding fp16(x), for b the bits of a float32 x >= 0: round to nearest, ties to even.

    Plain integer arithmetic (the same on a GPU, under the simulator and in numba.njit, which the
    tests run over every float32 of the range that matters). Negative inputs give 0."""
    if b <= 0:
        return 0
    if b >= 0x477FF000:  # 65520 (the tie above 65504, fp16's largest) and up: overflow; NaN stays NaN
        return 0x7F800000 if b <= 0x7F800000 else b
    if b >= 0x38800000:  # 2^-14 and up, a normal fp16: keep 10 of float32's 23 mantissa bits
        return (b + 0xFFF + ((b >> 13) & 1)) & 0xFFFFE000
    e = b >> 23  # biased float32 exponent; the fp16 value is a multiple q of 2^-24
    if e < 102:  # below 2^-25 (half the smallest subnormal): rounds to 0; 2^-25 itself ties to 0
        return 0
    m = (b & 0x7FFFFF) | 0x800000
    shift = 126 - e  # x * 2^24 = m / 2^shift, shift in 14..24
    q = m >> shift
    rem = m & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    if rem > half or (rem == half and (q & 1) == 1):
        q += 1
    if q == 0:
        return 0
    p = 0  # q * 2^-24 as float32 bits: q = 2^p + rest, p <= 10
    while (q >> (p + 1)) != 0:
        p += 1
    return ((p + 103) << 23) | ((q << (23 - p)) & 0x7FFFFF)


_fp16_round_bits = cuda.jit(device=True)(fp16_round_bits)


@cuda.jit(device=True, inline=True)
def _rint(x):
    """Round half to even of float32 x, as float32 (np.rint); x clamped to +-RINT_LIMIT."""
    x = min(max(x, -RINT_LIMIT), RINT_LIMIT)
    return (x + MAGIC) - MAGIC


@cuda.jit(device=True, inline=True)
def _clip(v, levels):
    return min(max(v, 0), levels)


@cuda.jit(device=True, inline=True)
def _stage(tile, w, row, col, c):
    """tile[r, :] = chunk c (32 columns) of the block's r-th group (row[r], from column col[r]): lane t
    loads column t of every one, so each load is 128 contiguous bytes."""
    t = cuda.threadIdx.x
    for r in range(PAIRS):
        tile[r, t] = w[row[r], col[r] + c * 32 + t]


@cuda.jit(cache=True)
def quantize_kernel(words, scales, zeros, w, bits, group_size):
    N, K = w.shape
    ng = K // group_size
    total = N * ng
    t = cuda.threadIdx.x
    p0 = cuda.blockIdx.x * PAIRS
    tile = cuda.shared.array(TILE, float32)
    row = cuda.shared.array(PAIRS, int32)  # each group's row and first column, for the staging loads
    col = cuda.shared.array(PAIRS, int32)
    pair = min(p0 + t, total - 1)  # pairs past the end redo the last one and store nothing
    live = p0 + t < total
    n = pair // ng
    g = pair % ng
    row[t] = n
    col[t] = g * group_size
    chunks = group_size // 32
    levels = (1 << bits) - 1

    lo = float32(0.0)  # the range always holds 0
    hi = float32(0.0)
    for c in range(chunks):
        cuda.syncthreads()
        _stage(tile, w, row, col, c)
        cuda.syncthreads()
        for j in range(32):
            lo = min(lo, tile[t, j])
            hi = max(hi, tile[t, j])
    s = _float_of(_fp16_round_bits(_bits_of((hi - lo) / float32(levels))))
    if s == float32(0.0):
        s = SMALLEST_SCALE
    zero = _clip(int(_rint(-lo / s)), levels)
    if live:
        scales[n, g] = s
        zeros[n, g] = uint8(zero)

    at = g * group_size // 32 * bits  # this group's first word in the row
    for c in range(chunks):
        cuda.syncthreads()
        _stage(tile, w, row, col, c)
        cuda.syncthreads()
        acc = 0  # the bit stream: codes go in at the top, whole words leave at the bottom
        held = 0
        for j in range(32):
            acc |= _clip(int(_rint(tile[t, j] / s)) + zero, levels) << held
            held += bits
            if held >= 32:
                if live:
                    words[n, at] = uint32(acc & 0xFFFFFFFF)
                at += 1
                acc >>= 32
                held -= 32


def check_shapes(N: int, K: int, bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS or K % group_size or group_size % 32:
        raise ValueError(f"device quantization needs bits in {SUPPORTED_BITS}, group_size a multiple of 32 and "
                         f"K a multiple of group_size; got bits {bits}, K {K}, group_size {group_size}")


def quantize(words, scales, zeros, w, bits: int, group_size: int, stream=0) -> None:
    """Fill words (N, K*bits/32) uint32, scales (N, K/G) float32 and zeros (N, K/G) uint8 from w (N, K) float32.

    Outputs may be row bands of bigger matrices (C-contiguous rows)."""
    N, K = w.shape
    check_shapes(N, K, bits, group_size)
    ng = K // group_size
    want = {"words": (words, (N, K * bits // 32), np.uint32), "scales": (scales, (N, ng), np.float32),
            "zeros": (zeros, (N, ng), np.uint8)}
    for name, (a, shape, dtype) in want.items():
        if tuple(a.shape) != shape or a.dtype != dtype:
            raise ValueError(f"quantize: {name} must be {np.dtype(dtype).name} {shape}, got {a.dtype} {tuple(a.shape)}")
    if w.dtype != np.float32:
        raise ValueError(f"quantize: w must be float32, got {w.dtype}")
    if N * ng:
        quantize_kernel[(N * ng + PAIRS - 1) // PAIRS, PAIRS, stream](words, scales, zeros, w, bits, group_size)
