"""A warp's 16x8x16 matrix product on the tensor cores (PTX `mma.sync ... m16n8k16 .f32.f16.f16.f32`),
and the float16 packing its operands need.

    mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, buf) -> (d0, d1, d2, d3)
        D (16 x 8, float32) = A (16 x 16, float16) @ B (16 x 8, float16) + C, the operands spread
        over the warp's 32 lanes: lane l, g = l // 4, c = l % 4 holds (each aK, bK a uint32 of two
        float16, the lower half first)
            a0 = A[g, 2c : 2c+2]     a1 = A[g+8, 2c : 2c+2]   a2 = A[g, 2c+8 : 2c+10]   a3 = A[g+8, 2c+8 : 2c+10]
            b0 = B[2c : 2c+2, g]     b1 = B[2c+8 : 2c+10, g]
            c0, c1 = C[g, 2c : 2c+2]   c2, c3 = C[g+8, 2c : 2c+2]   (d alike)
        Every lane of the warp calls it together. buf: a shared uint32 array (blockDim, 6) the
        simulator passes the fragments through (unused on a GPU), so there every thread of the block
        calls it the same number of times.
    pack_f16x2(lo, hi) -> uint32       two float32 rounded to float16 (nearest even), lo in the lower half
    unpack_f16x2(u) -> (lo, hi)        the two float16 of u as float32

Numba has no binding for either, so on the device they are inline PTX, as dp4a.py's; the simulator
runs the Python below. The decode attention scores a tile of keys against the query heads with
these: one instruction does 2,048 multiply-adds, where the CUDA-core kernel spends a warp sum
(five shuffles) a key a head.
"""

from __future__ import annotations

import numpy as np

import koifish_cuda.compat  # noqa: F401
from numba import config, cuda, float32, types, uint32


def mma_ref(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float64 A @ B + C of the float16 values of A (16, 16) and B (16, 8)."""
    return np.asarray(a, np.float16).astype(np.float64) @ np.asarray(b, np.float16).astype(np.float64) + c


def fragments_ref(a: np.ndarray, b: np.ndarray):
    """The registers each lane holds for A (16, 16) and B (16, 8): uint32 arrays (32, 4) and (32, 2)."""
    fa, fb = np.zeros((32, 4), np.uint32), np.zeros((32, 2), np.uint32)
    a16, b16 = np.asarray(a, np.float16), np.asarray(b, np.float16)
    for lane in range(32):
        g, c = divmod(lane, 4)
        fa[lane] = [a16[r, k:k + 2].copy().view(np.uint32)[0]
                    for r, k in ((g, 2 * c), (g + 8, 2 * c), (g, 2 * c + 8), (g + 8, 2 * c + 8))]
        fb[lane] = [b16[k:k + 2, g].copy().view(np.uint32)[0] for k in (2 * c, 2 * c + 8)]
    return fa, fb


if config.ENABLE_CUDASIM:

    def _halves(u):
        return np.asarray([int(u) & 0xFFFFFFFF], np.uint32).view(np.float16).astype(np.float64)

    @cuda.jit(device=True)
    def mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, buf):
        t = cuda.threadIdx.x
        for i, v in enumerate((a0, a1, a2, a3, b0, b1)):
            buf[t, i] = v
        cuda.syncthreads()
        base, lane = t - t % 32, t % 32
        g, c = lane // 4, lane % 4
        a = np.zeros((16, 16))
        b = np.zeros((16, 8))
        for l in range(32):
            gl, cl = l // 4, l % 4
            r = buf[base + l]
            a[gl, 2 * cl:2 * cl + 2] = _halves(r[0])
            a[gl + 8, 2 * cl:2 * cl + 2] = _halves(r[1])
            a[gl, 2 * cl + 8:2 * cl + 10] = _halves(r[2])
            a[gl + 8, 2 * cl + 8:2 * cl + 10] = _halves(r[3])
            b[2 * cl:2 * cl + 2, gl] = _halves(r[4])
            b[2 * cl + 8:2 * cl + 10, gl] = _halves(r[5])
        cuda.syncthreads()
        d = a @ b
        return (float32(d[g, 2 * c] + c0), float32(d[g, 2 * c + 1] + c1), float32(d[g + 8, 2 * c] + c2),
                float32(d[g + 8, 2 * c + 1] + c3))

    def pack_f16x2(lo, hi):
        return uint32(np.asarray([lo, hi], np.float32).astype(np.float16).view(np.uint32)[0])

    def unpack_f16x2(u):
        lo, hi = np.asarray([int(u) & 0xFFFFFFFF], np.uint32).view(np.float16).astype(np.float32)
        return float32(lo), float32(hi)

else:
    from llvmlite import ir
    from numba.cuda.extending import intrinsic

    from koifish_cuda.cvt import pack_pair

    @intrinsic
    def _mma(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        sig = types.UniTuple(types.float32, 4)(*([types.uint32] * 6 + [types.float32] * 4))

        def codegen(context, builder, signature, args):
            f32, i32 = ir.FloatType(), ir.IntType(32)
            asm = ir.InlineAsm(
                ir.FunctionType(ir.LiteralStructType([f32] * 4), [i32] * 6 + [f32] * 4),
                "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, "
                "{$10, $11, $12, $13};", "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")
            res = builder.call(asm, list(args))
            return context.make_tuple(builder, signature.return_type, [builder.extract_value(res, k) for k in range(4)])

        return sig, codegen

    @cuda.jit(device=True, inline=True)
    def mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, buf):  # buf is unused on a GPU
        return _mma(uint32(a0), uint32(a1), uint32(a2), uint32(a3), uint32(b0), uint32(b1),
                    float32(c0), float32(c1), float32(c2), float32(c3))

    _pack = pack_pair("f16")

    @cuda.jit(device=True, inline=True)
    def pack_f16x2(lo, hi):
        return _pack(float32(lo), float32(hi))

    @intrinsic
    def _unpack(typingctx, u):
        sig = types.UniTuple(types.float32, 2)(types.uint32)

        def codegen(context, builder, signature, args):
            f32 = ir.FloatType()
            asm = ir.InlineAsm(ir.FunctionType(ir.LiteralStructType([f32] * 2), [ir.IntType(32)]),
                               "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }",
                               "=f,=f,r")
            res = builder.call(asm, list(args))
            return context.make_tuple(builder, signature.return_type, [builder.extract_value(res, k) for k in range(2)])

        return sig, codegen

    @cuda.jit(device=True, inline=True)
    def unpack_f16x2(u):
        return _unpack(uint32(u))
