"""bfloat16 held as uint16 bits: the operands of bf16 GEMMs (the Qwen3 prefill's, the training engine's).

bf16 is the top half of a float32. Rounding is to nearest, ties to even (as the hardware's
cvt.rn.bf16.f32): add 0x7FFF plus the lowest kept bit, keep the top 16 bits. Arrays are uint16
so the same kernels run under Numba's simulator (which has no bf16 type) and cuBLAS only sees
pointers. NaN payloads are not preserved (no NaN reaches these buffers).
"""

from __future__ import annotations

import numpy as np

import koifish_cuda.compat  # noqa: F401
from koifish_cuda.compat import nb
from numba import config, cuda, float32, int32, uint16, uint32


def to_bf16_ref(x) -> np.ndarray:
    """uint16 bf16 bits of x, rounded to nearest even."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def from_bf16_ref(h) -> np.ndarray:
    """float32 values of uint16 bf16 bits."""
    return (np.asarray(h, np.uint16).astype(np.uint32) << 16).view(np.float32)


# Bit casts between float32 and its 32 bits (the simulator has no libdevice).
if config.ENABLE_CUDASIM:

    def float_bits(x):
        return np.uint32(np.float32(x).view(np.uint32))

    def as_float(i):
        return np.uint32(int(i) & 0xFFFFFFFF).view(np.float32)

else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def float_bits(x):
        return uint32(libdevice.float_as_int(x))

    @cuda.jit(device=True, inline=True)
    def as_float(i):
        return libdevice.int_as_float(int32(i))


@cuda.jit(device=True, inline=True)
def _f32_to_bf16_int(x):
    u = float_bits(x)
    return uint16((u + uint32(0x7FFF) + ((u >> uint32(16)) & uint32(1))) >> uint32(16))


@cuda.jit(device=True, inline=True)
def bf16_to_f32(h):
    return as_float(uint32(h) << uint32(16))


# Two bf16 values in one 32-bit word (the lower column in the low half, as memory holds a uint16 pair):
# kernels on bf16 rows read and write them a word at a time, half the load/store instructions.
@cuda.jit(device=True, inline=True)
def word_lo(u):
    """The float32 value of the lower bf16 of word u (uint32)."""
    return as_float(u << uint32(16))


@cuda.jit(device=True, inline=True)
def word_hi(u):
    return as_float(u & uint32(0xFFFF0000))


@cuda.jit(device=True, inline=True)
def pack_bits(lo, hi):
    """Two bf16 bit patterns, lower column first, as one word."""
    return uint32(lo) | (uint32(hi) << uint32(16))


# f32_to_bf16(x) -> uint16 and pack_word(lo, hi) -> uint32 (two values rounded to bf16, the lower column in
# the low half): on sm_80 and later one cvt.rn.bf16x2.f32 (F2FP) each, the same rounding as the integer
# sequence the simulator and older GPUs run (~5 instructions a value); the bf16 classifier spent most of its
# instructions there and on bounds checks (stop 18).
if config.ENABLE_CUDASIM:
    f32_to_bf16 = _f32_to_bf16_int

    def pack_word(lo, hi):
        return pack_bits(_f32_to_bf16_int(lo), _f32_to_bf16_int(hi))

else:
    from numba import types
    from numba.cuda.extending import overload

    from koifish_cuda.compat import compiles_for
    from koifish_cuda.cvt import pack_pair

    _cvt_bf16x2 = pack_pair("bf16")

    def f32_to_bf16(x):
        raise NotImplementedError("device function")

    def pack_word(lo, hi):
        raise NotImplementedError("device function")

    @overload(f32_to_bf16, target="cuda")
    def _f32_to_bf16(x):
        if compiles_for((8, 0)):
            return lambda x: uint16(_cvt_bf16x2(float32(x), float32(x)) & uint32(0xFFFF))
        return lambda x: _f32_to_bf16_int(x)

    @overload(pack_word, target="cuda")
    def _pack_word(lo, hi):
        if compiles_for((8, 0)):
            return lambda lo, hi: _cvt_bf16x2(float32(lo), float32(hi))
        return lambda lo, hi: pack_bits(_f32_to_bf16_int(lo), _f32_to_bf16_int(hi))


# load(a, i) / store(a, i, v): an element of a float32 array, or of a uint16 array holding bf16 bits,
# as float32, so one kernel serves both precisions of the training engine (Numba compiles a kernel
# per argument type; the overload picks the conversion at compile time).
if config.ENABLE_CUDASIM:

    def load(a, i):
        return bf16_to_f32(a[i]) if a.dtype == np.uint16 else np.float32(a[i])

    def store(a, i, v):
        a[i] = f32_to_bf16(v) if a.dtype == np.uint16 else v

    def rounded(a, v):
        return bf16_to_f32(f32_to_bf16(v)) if a.dtype == np.uint16 else np.float32(v)

else:

    def load(a, i):
        raise NotImplementedError("device function")

    def store(a, i, v):
        raise NotImplementedError("device function")

    def rounded(a, v):
        raise NotImplementedError("device function")

    @overload(load, target="cuda")
    def _load(a, i):
        if a.dtype == types.uint16:
            return lambda a, i: bf16_to_f32(a[i])
        return lambda a, i: float32(a[i])

    @overload(store, target="cuda")
    def _store(a, i, v):
        if a.dtype == types.uint16:
            def bits(a, i, v):
                a[i] = f32_to_bf16(v)
            return bits

        def plain(a, i, v):
            a[i] = v
        return plain

    @overload(rounded, target="cuda")
    def _rounded(a, v):
        """v as an element of a would hold it."""
        if a.dtype == types.uint16:
            return lambda a, v: bf16_to_f32(f32_to_bf16(v))
        return lambda a, v: float32(v)


# load_4(a, idx) / store_4(a, idx, v0, v1, v2, v3): four consecutive elements along the last axis, as
# load/store above, in one 16-byte (float32) or 8-byte (bf16) memory instruction (vload.py); idx
# aligned to four elements.
if config.ENABLE_CUDASIM:

    def load_4(a, idx):
        return tuple(load(a, (*idx[:-1], idx[-1] + k)) for k in range(4))

    def store_4(a, idx, v0, v1, v2, v3):
        for k, v in enumerate((v0, v1, v2, v3)):
            store(a, (*idx[:-1], idx[-1] + k), v)

else:
    from koifish_cuda.vload import load4, store4

    def load_4(a, idx):
        raise NotImplementedError("device function")

    def store_4(a, idx, v0, v1, v2, v3):
        raise NotImplementedError("device function")

    @overload(load_4, target="cuda")
    def _load_4(a, idx):
        if a.dtype == types.uint16:
            def bits(a, idx):
                h0, h1, h2, h3 = load4(a, idx)
                return bf16_to_f32(h0), bf16_to_f32(h1), bf16_to_f32(h2), bf16_to_f32(h3)
            return bits
        return lambda a, idx: load4(a, idx)

    @overload(store_4, target="cuda")
    def _store_4(a, idx, v0, v1, v2, v3):
        if a.dtype == types.uint16:
            def bits(a, idx, v0, v1, v2, v3):
                store4(a, idx, f32_to_bf16(v0), f32_to_bf16(v1), f32_to_bf16(v2), f32_to_bf16(v3))
            return bits
        return lambda a, idx, v0, v1, v2, v3: store4(a, idx, v0, v1, v2, v3)


@cuda.jit(cache=True)
def to_bf16_kernel(out, x):
    """out (R, C) uint16 = bf16(x (R, C) float32); a thread per element, grid-stride."""
    R, C = x.shape
    for i in range(cuda.grid(1), R * C, cuda.gridsize(1)):
        r = i // C
        c = i - r * C
        out[r, c] = f32_to_bf16(x[r, c])


def to_bf16(out, x, stream=0):
    """out (R, C) uint16 (may be a view of a wider buffer) from x (R, C) float32."""
    if out.shape != x.shape:
        raise ValueError(f"to_bf16: out {out.shape} and x {x.shape} differ")
    n = x.shape[0] * x.shape[1]
    to_bf16_kernel[koifish_cuda.compat.stride_blocks((n + 255) // 256, 8192), 256, stream](nb(out), nb(x))
