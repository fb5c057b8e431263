"""Batch-1 4-bit GEMV on 8-bit activations (W4A8): the decode step's matrix-vector products.

x (1, K) is cut into chunks of 16 values, each rounded to int8 with its own scale
(xs = max|x| / 127, round half to even), as llama.cpp does with its q8 activation blocks; a weight
chunk's 16 4-bit codes then meet their x bytes in four dp4a instructions (dp4a.py):

    y[n] = sum_c scale[n, g(c)] * xs[c] * (sum_j q[n, 16c + j] * x8[16c + j] - zero[n, g(c)] * sum_j x8[16c + j])

The sum inside is exact in integers, so the kernel and its reference below differ only by float32
rounding of the outer sum. The price is the rounding of x: each chunk keeps 8 bits of its largest
value: a relative error of y near 5e-3 on Gaussian x, 20x under the 4-bit weights' own ~0.1
(tests/test_quant_a8.py). The packed weights, scales and zeros are quant.py's, unchanged.
"""

from __future__ import annotations

import numpy as np

CHUNK = 16  # x values per int8 scale: one uint64 of 4-bit codes


def quantize_x16_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (K,) -> (x8 (K,) int64 in [-127, 127], xs (K/16,) float32): the kernel's rounding (127 / max in
    float32; x times it exact, rounded once, half to even: the kernel's fma)."""
    x = np.asarray(x, np.float32).reshape(-1, CHUNK)
    amax = np.abs(x).max(axis=1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    x8 = np.rint(x.astype(np.float64) * inv[:, None].astype(np.float64)).astype(np.int64)  # exact product
    return x8.reshape(-1), (amax / np.float32(127.0)).astype(np.float32)


def pack_x16_ref(x8: np.ndarray) -> np.ndarray:
    """int8 values (K,) -> (K/4,) uint32 in the order the kernel meets the codes' nibbles: per chunk of 16,
    word 0 holds values 0, 2, 4, 6 (low byte first), word 1 1, 3, 5, 7, word 2 8..14, word 3 9..15."""
    b = (np.asarray(x8).reshape(-1, 2, 4, 2) & 0xFF).astype(np.uint32)  # (chunk, half, pair, parity)
    w = (b << (8 * np.arange(4, dtype=np.uint32))[None, None, :, None]).sum(axis=2, dtype=np.uint32)
    return w.reshape(-1)  # (chunk, half, parity): words 2 * half + parity


def round_x16_ref(x: np.ndarray) -> np.ndarray:
    """x (..., K) with every row rounded as the kernel rounds its one row (x8 * xs, float32): W_deq @ this
    is what the kernel computes, so a float model fed it measures what int8 activations cost."""
    x = np.asarray(x, np.float32)
    x8, xs = quantize_x16_ref(x.reshape(-1))
    return (x8.reshape(-1, CHUNK) * xs[:, None]).astype(np.float32).reshape(x.shape)


def dequant_matvec4_a8_ref(x: np.ndarray, codes, scales, zeros, group_size: int) -> np.ndarray:
    """x (1, K) against 4-bit codes (N, K), scales (N, ng), zeros (N, ng) -> (1, N) float64."""
    N, K = codes.shape
    x8, xs = quantize_x16_ref(x[0])
    q = codes.reshape(N, K // CHUNK, CHUNK).astype(np.int64)
    dot = (q * x8.reshape(-1, CHUNK)).sum(-1)  # (N, K/16), exact
    g = np.arange(K // CHUNK) // (group_size // CHUNK)
    z = zeros.astype(np.int64)[:, g]
    s = scales.astype(np.float64)[:, g]
    return ((s * xs.astype(np.float64)) * (dot - z * x8.reshape(-1, CHUNK).sum(-1))).sum(-1)[None]


# ---- CUDA ------------------------------------------------------------------------------------
# The block shape is quant.py's batch-1 kernel's (R rows a block, its W warps splitting K, lane l of
# warp w on uint64 32 (w + W s) + l of every row): only the inner product changed. Rounding a chunk:
# fma(v, 127 / max, 1.5 * 2^23) in float32 leaves round-half-even(v) in the low bits (|v| <= 127),
# so the byte is an AND away and no F2I is spent. Where x comes as float32 every block rounds all of
# it (a lane its chunks, once for the block's rows); the GPU engine instead hands the GEMV x rounded
# beforehand (quantize_x16, or the kernel that made x: rmsnorm.add_rmsnorm_x16, swiglu.swiglu_x16,
# the attention merge), and the blocks can then be small. Measured on an H200 (bench_quant_gemv.py
# --variants), one Qwen3-32B token's GEMVs: float32 x 14.58 ms; int8 x rounded in the kernel 9.55;
# rounded beforehand, 16 rows x 4 warps 8.17, rows_warps_for's blocks 5.72. Tried and dropped: two
# uint64 a row per 16-byte load (15.48 ms at stop 14: registers), 32- and 4-row blocks (slower on
# every shape).
import functools  # noqa: E402

import koifish_cuda.compat  # noqa: E402,F401
from koifish_cuda.pdl import aware, begin  # noqa: E402
from koifish_cuda.bf16 import float_bits  # noqa: E402
from koifish_cuda.dp4a import dp4a  # noqa: E402
from koifish_cuda.quant import ROWS4, WARPS4, _block_rows, _store_rows  # noqa: E402
from koifish_cuda.vload import aligned, load4, store4  # noqa: E402
from numba import config, cuda, float32, int32, uint32, uint64  # noqa: E402

if config.ENABLE_CUDASIM:

    def _fma(a, b, c):  # the simulator's float32 arithmetic would round a * b first; fma.rn does not
        return np.float32(np.float64(a) * np.float64(b) + np.float64(c))

else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def _fma(a, b, c):
        return libdevice.fmaf(a, b, c)


ROUNDER = np.float32(12582912.0)  # 1.5 * 2^23: adding it rounds to an integer, kept in the low bits
ROUNDER_BITS = 0x4B400000
NIBBLES = 0x0F0F0F0F


@cuda.jit(device=True, inline=True)
def _round_chunk(xr, xw):
    """Round the 16 values xr to int8 by their largest magnitude; write the bytes into xw's four words
    in the order the codes' nibbles come out of theirs ([0] codes 0, 2, 4, 6: the low nibbles of the
    low word; [1] 1, 3, 5, 7; [2] 8, 10, 12, 14; [3] 9, 11, 13, 15). Returns (scale, sum of the int8
    values)."""
    amax = float32(0.0)
    for j in range(CHUNK):
        amax = max(amax, abs(xr[j]))
    inv = float32(127.0) / amax if amax > float32(0.0) else float32(0.0)
    for k in range(4):
        xw[k] = uint32(0)
    xsum = int32(0)
    for j in range(CHUNK):
        # one rounding, explicitly: left to the compiler, a * b + c may or may not be contracted into an
        # fma, and x * inv's own rounding flips the odd tie (the reference must know which)
        b = float_bits(_fma(xr[j], inv, ROUNDER))
        xsum += int32(b) - int32(ROUNDER_BITS)
        xw[(j // 8) * 2 + j % 2] |= (b & uint32(0xFF)) << uint32(8 * ((j % 8) // 2))
    return amax / float32(127.0), xsum


@cuda.jit(device=True, inline=True)
def _dot_chunk(q, xw):
    """sum_j code_j * x8_j over the 16 codes of the uint64 q: four dp4a."""
    lo = uint32(q & uint64(0xFFFFFFFF))
    hi = uint32(q >> uint64(32))
    d = dp4a(lo & uint32(NIBBLES), int32(xw[0]), int32(0))
    d = dp4a((lo >> uint32(4)) & uint32(NIBBLES), int32(xw[1]), d)
    d = dp4a(hi & uint32(NIBBLES), int32(xw[2]), d)
    return dp4a((hi >> uint32(4)) & uint32(NIBBLES), int32(xw[3]), d)


# blocks an SM each block shape is bounded for at 4 warps (registers: the rows' uint64s and sums grow
# with R)
ROW_CHOICES = {8: 4, 16: 3}


def rows_warps_for(N: int, K: int, pre: bool = True) -> tuple[int, int]:
    """(rows, warps) of a block for an (N, K) matrix, as measured on the H200 (bench_quant_gemv.py
    --variants, Qwen3-32B shapes; bench/results/quant_gemv_variants_s15*.json). x rounded beforehand:
    small blocks of 8 rows: 1 warp for many rows (gate_up 51200 x 5120 45.9 us, the head 115.0), 3 for
    the rest (qkv 10.7, o_proj 8.4, down 22.5: fewer blocks, so more warps each to fill the SMs): a
    token's GEMVs 5.72 ms, against 8.17 at 16 rows x 4 warps and 6.26 at 8 x 2 everywhere. x rounded
    in the kernel (each block rounds all of x): 8 rows for the attention matrices, 16 for the rest
    (measured at 4 warps). Confirmed cold (every call from memory, as in decode; bench_quant_gemv.py
    --cold --cold-sweep, stop 17): the fastest of {8, 16} rows x {1, 2, 3, 4, 6, 8} warps on every shape."""
    if pre:
        return 8, (1 if N >= 32768 else 3)
    return (8 if K <= 8192 and N <= 16384 else ROWS4), WARPS4


@cuda.jit(device=True, inline=True)
def store_rounded(v, c, xq, xs, xsum, xw):
    """The 16 values v rounded (_round_chunk) and stored as chunk c of the triple: codes xq (one 16-byte
    store), scale xs[c], sum xsum[c]. What every kernel that rounds x for the GEMV ends with."""
    s, sm = _round_chunk(v, xw)
    store4(xq, (c * 4,), xw[0], xw[1], xw[2], xw[3])
    xs[c] = s
    xsum[c] = sm


@cuda.jit(device=True, inline=True)
def _load_f32(x, i, xr):
    """xr = chunk i of the float32 row x (1, K), by four 16-byte loads."""
    for j in range(0, CHUNK, 4):
        xr[j], xr[j + 1], xr[j + 2], xr[j + 3] = load4(x, (0, i * CHUNK + j))


@cuda.jit(device=True, inline=True)
def _round_x(x, i, xr, xw):
    """Chunk i of the float32 row x (1, K) rounded into xw; (scale, sum)."""
    _load_f32(x, i, xr)
    return _round_chunk(xr, xw)


@cuda.jit(device=True, inline=True)
def _load_x(x, i, xr, xw):
    """Chunk i of an x rounded beforehand (quantize_x16's (codes, scales, sums)): one 16-byte load."""
    xq, xsc, xsm = x
    xw[0], xw[1], xw[2], xw[3] = load4(xq, (i * 4,))
    return xsc[i], xsm[i]


@aware
@cuda.jit(cache=True)
def quantize_x16_kernel(x, xq, xs, xsum):
    """One thread a chunk of 16: x (1, K) float32 -> codes xq (K/4,) uint32 in _round_chunk's byte
    order, scales xs (K/16,) float32, sums xsum (K/16,) int32."""
    begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if c < xs.shape[0]:
        xr = cuda.local.array(CHUNK, float32)
        xw = cuda.local.array(4, uint32)
        _load_f32(x, c, xr)
        store_rounded(xr, c, xq, xs, xsum, xw)


def quantize_x16(x, xq, xs, xsum, stream=0) -> None:
    """x (1, K) float32 rounded once for every GEMV that reads it (dequant_matvec4_a8 with
    x=(xq, xs, xsum)): xq (K/4,) uint32, xs (K/16,) float32, xsum (K/16,) int32."""
    K = x.shape[1]
    if x.shape[0] != 1 or K % CHUNK or xq.shape != (K // 4,) or xs.shape != (K // CHUNK,) or xsum.shape != xs.shape:
        raise ValueError(f"quantize_x16: x (1, K) with K a multiple of {CHUNK} into (K/4,), (K/16,), (K/16,); "
                         f"got {x.shape}, {xq.shape}, {xs.shape}, {xsum.shape}")
    if not (aligned(x, 4) and aligned(xq, 4)):
        raise ValueError("quantize_x16: x and xq must start on a 16-byte boundary")
    quantize_x16_kernel[(K // CHUNK + 127) // 128, 128, stream](x, xq, xs, xsum)


@functools.lru_cache(maxsize=None)
def _kernel(R: int, pre: bool, W: int, QPG: int):
    """The kernel for R rows a block (a compile-time constant: R uint64 loads in flight a lane), W warps
    splitting K and QPG uint64s a quantization group; pre: x comes rounded (quantize_x16's triple)
    instead of as float32. Scales and zeros come flat ((N * groups,)), indexed from 32-bit row offsets."""
    BUF = 32 * W  # shared sizes must be plain constants
    RED = R * W
    x_chunk = _load_x if pre else _round_x
    # the register bound of 128-thread blocks, kept for other widths (the same threads an SM)
    bounds = {} if config.ENABLE_CUDASIM else {"launch_bounds": (BUF, max(1, ROW_CHOICES[R] * WARPS4 // W))}

    @aware
    @cuda.jit(cache=True, **bounds)
    def kernel(out, x, q64, scales, zeros):
        """out (1, N) = x (1, K) @ dequant(W).T with x rounded to int8 per 16 values (see above)."""
        N = q64.shape[0]
        Kq = q64.shape[1]
        buf = cuda.shared.array(BUF, float32)
        red = cuda.shared.array(RED, float32)
        t = cuda.threadIdx.x
        n0 = cuda.blockIdx.x * R
        acc = cuda.local.array(R, float32)
        rows = cuda.local.array(R, int32)
        _block_rows(acc, rows, n0, N, R)
        wv = cuda.local.array(R, uint64)
        xr = cuda.local.array(CHUNK, float32)
        xw = cuda.local.array(4, uint32)
        so = cuda.local.array(R, uint32)  # the rows' offsets into the flat scales and zeros
        ru = cuda.local.array(R, uint32)
        for r in range(R):
            so[r] = uint32(rows[r] * (Kq // QPG))
            ru[r] = uint32(rows[r])
        begin()  # PDL: wait for the previous kernel's writes (koifish_cuda.pdl)
        # Every hot index unsigned: Numba adds negative-index wraparound to signed ones (3 instructions each)
        for i in range(t, Kq, BUF):  # lane l of warp w: uint64 32 (w + W s) + l
            iu = uint32(i)
            for r in range(R):  # the row loads first: they are what the kernel waits for
                wv[r] = q64[ru[r], iu]
            xs, xsum = x_chunk(x, iu, xr, xw)
            g = iu // uint32(QPG)  # a constant divisor: a shift, not a 64-bit division a turn
            for r in range(R):
                k = so[r] + g
                # int32(): Numba widens int32 arithmetic to int64, and an int64 -> float conversion is slow
                dz = int32(_dot_chunk(wv[r], xw) - int32(zeros[k]) * xsum)
                acc[r] += scales[k] * (xs * float32(dz))
        _store_rows(out, acc, buf, red, t, n0, N, R, W)

    return kernel


def dequant_matvec4_a8(out, x, words, scales, zeros, group_size: int, stream=0, rows: int | None = None,
                       warps: int | None = None):
    """out (1, N) float32 = x (1, K) float32 @ W.T, W 4-bit as quant.dequant_matvec takes it (words
    uint32 (N, K/8), scales float32 and zeros uint8 (N, K/group_size)); K a multiple of 32, group_size
    of 16, x on a 16-byte boundary. x may also come rounded already: quantize_x16's (xq, xs, xsum).
    rows: a block's rows (ROW_CHOICES), warps its warps (1 to 8); by default rows_warps_for(N, K, pre).
    (Running the next RMSNorm in the last block to finish, counted in by an atomic, saved two graph
    nodes a layer but measured slower: 107.4 against 116.8 tokens/s at Qwen3-32B's shapes, stop 16.)
    The group size is compiled in and the hot indices are unsigned 32-bit (the flat kernel, stop 19): ptxas
    counts 245 instructions a lane a turn of 8 rows instead of 345 (a 64-bit division for the group, 2-D
    indexing, wraparound code) and 88 registers instead of 128; ncu had found the kernel nearer issue-bound
    than memory-bound (stop 18). Qwen3-32B decode on an H200: 128.6 -> 139.9 tokens/s at 1k context."""
    pre = isinstance(x, tuple)
    M, K = (1, 4 * x[0].shape[0]) if pre else x.shape
    if M != 1 or K % 32 or group_size % CHUNK:
        raise ValueError(f"dequant_matvec4_a8 takes one row of x, K a multiple of 32 and group_size of {CHUNK}; "
                         f"got x {x.shape}, group_size {group_size}")
    if not aligned(x[0] if pre else x, 4):
        raise ValueError("dequant_matvec4_a8: x must start on a 16-byte boundary")
    N = out.shape[1]
    best = rows_warps_for(N, K, pre)
    rows = best[0] if rows is None else rows
    warps = best[1] if warps is None else warps
    if rows not in ROW_CHOICES:
        raise ValueError(f"dequant_matvec4_a8: rows a block must be one of {sorted(ROW_CHOICES)}, got {rows}")
    if not 1 <= warps <= 8:
        raise ValueError(f"dequant_matvec4_a8: 1 to 8 warps a block, got {warps}")
    if not (scales.flags.c_contiguous and zeros.flags.c_contiguous):
        raise ValueError("dequant_matvec4_a8: scales and zeros must be C-contiguous (N, K/group_size)")
    _kernel(rows, pre, warps, group_size // CHUNK)[(N + rows - 1) // rows, 32 * warps, stream](
        out, x, words.view(np.uint64), scales.reshape(-1), zeros.reshape(-1))
