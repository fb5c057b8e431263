"""Two float32 rounded to one 32-bit word of two 16-bit floats, on the device: PTX cvt.rn.f16x2.f32 or
cvt.rn.bf16x2.f32 (one F2FP instruction; the bf16 form needs sm_80). Numba has no binding for either.

    pack_pair("f16") / pack_pair("bf16") -> an intrinsic (lo, hi) -> uint32, lo in the lower half.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.cuda.extending import intrinsic


def pack_pair(fmt: str):
    asm_text = f"cvt.rn.{fmt}x2.f32 $0, $1, $2;"  # the first source goes to the upper half

    @intrinsic
    def pack(typingctx, lo, hi):
        sig = types.uint32(types.float32, types.float32)

        def codegen(context, builder, signature, args):
            asm = ir.InlineAsm(ir.FunctionType(ir.IntType(32), [ir.FloatType()] * 2), asm_text, "=r,f,f")
            return builder.call(asm, [args[1], args[0]])

        return sig, codegen

    return pack
