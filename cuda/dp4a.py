"""Four-way byte dot product with a 32-bit accumulator (the GPU's dp4a instruction, sm_61+).

    dp4a(a, b, c) = c + sum_k a_k * b_k    a_k: byte k of a, unsigned (0..255)
                                             b_k: byte k of b, signed (-128..127)

Numba has no binding for it, so on the device it is one line of inline PTX (`dp4a.u32.s32`),
the way numba-cuda's own cache-hint loads are written; the simulator runs the Python below.
One instruction does four multiply-adds: the 4-bit x 8-bit GEMV (quant_a8.py) spends ~1 instruction
a code instead of the ~3 of float32 dequantization.
"""

from __future__ import annotations

import numpy as np

import koifish_cuda.compat  # noqa: F401
from numba import config, cuda, int32, types


def dp4a_ref(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Elementwise over uint32 a, int32 b, int32 c (int64 result, no wrap-around)."""
    ua = np.ascontiguousarray(a, np.uint32)[..., None].view(np.uint8).astype(np.int64)  # (..., 4) bytes, little-endian
    sb = np.ascontiguousarray(b, np.int32)[..., None].view(np.int8).astype(np.int64)
    return np.asarray(c, np.int64) + (ua * sb).sum(-1)


if config.ENABLE_CUDASIM:

    def dp4a(a, b, c):
        s = int(c)
        for k in range(4):
            ua = (int(a) >> (8 * k)) & 0xFF
            sb = (int(b) >> (8 * k)) & 0xFF
            s += ua * (sb - 256 if sb >= 128 else sb)
        return int32(s)

else:
    from llvmlite import ir
    from numba.cuda.extending import intrinsic

    @intrinsic
    def dp4a(typingctx, a, b, c):
        """a (unsigned bytes), b (signed bytes), c: cast to 32-bit integers by the caller's types."""
        sig = types.int32(types.uint32, types.int32, types.int32)

        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            asm = ir.InlineAsm(ir.FunctionType(i32, [i32, i32, i32]), "dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r")
            return builder.call(asm, list(args))

        return sig, codegen
