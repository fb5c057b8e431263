"""Asynchronous global -> shared copies (PTX `cp.async`, sm_80+): loads that hold no register while in flight.

A kernel that loads into registers waits for them before it can compute, and can only keep as many bytes
in flight as it has registers to spare. `cp.async` writes shared memory behind the thread's back: a
thread issues the copies of turns s+1 .. s+D, computes on turn s, and waits only for the oldest group.

    copy8_async(dst, di, src, row, col)   dst[di] (shared uint64, 1-D) <- src[row, col] (global uint64, 2-D)
    commit()                              closes the copies issued since the last commit into a group
    wait_groups(n)                        waits until at most n of this thread's groups are pending
                                          (n a compile-time constant, 0 to 7)

A thread sees its own completed copies after wait_groups; other threads need a barrier after it. The
simulator copies at once (commit and wait do nothing).
"""

from __future__ import annotations

import koifish_cuda.compat  # noqa: F401
from numba import config, types

if config.ENABLE_CUDASIM:

    def copy8_async(dst, di, src, row, col):
        dst[di] = src[row, col]

    def commit():
        pass

    def wait_groups(n):
        pass

else:
    from llvmlite import ir
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic

    @intrinsic
    def copy8_async(typingctx, dst, di, src, row, col):
        if not (isinstance(dst, types.Array) and dst.ndim == 1 and isinstance(src, types.Array) and src.ndim == 2
                and dst.dtype.bitwidth == 64 and src.dtype.bitwidth == 64):
            return None

        def codegen(context, builder, sig, args):
            dty, ity, sty, rty, cty = sig.args
            d = context.make_array(dty)(context, builder, value=args[0])
            s = context.make_array(sty)(context, builder, value=args[2])
            idx = [context.cast(builder, a, t, types.intp) for a, t in ((args[1], ity),)]
            rc = [context.cast(builder, args[3], rty, types.intp), context.cast(builder, args[4], cty, types.intp)]
            dp = cgutils.get_item_pointer(context, builder, dty, d, idx, wraparound=False)
            sp = cgutils.get_item_pointer(context, builder, sty, s, rc, wraparound=False)
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [dp.type, sp.type]),
                               "{ .reg .u64 sa; .reg .u32 s32; cvta.to.shared.u64 sa, $0; cvt.u32.u64 s32, sa; "
                               "cp.async.ca.shared.global [s32], [$1], 8; }", "l,l,~{memory}", side_effect=True)
            builder.call(asm, [dp, sp])
            return context.get_dummy_value()

        return types.void(dst, di, src, row, col), codegen

    @intrinsic
    def commit(typingctx):
        def codegen(context, builder, sig, args):
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), "cp.async.commit_group;", "~{memory}",
                               side_effect=True)
            builder.call(asm, [])
            return context.get_dummy_value()

        return types.void(), codegen

    @intrinsic
    def wait_groups(typingctx, n):
        if not isinstance(n, types.IntegerLiteral):
            return None
        count = n.literal_value

        def codegen(context, builder, sig, args):
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), f"cp.async.wait_group {count};", "~{memory}",
                               side_effect=True)
            builder.call(asm, [])
            return context.get_dummy_value()

        return types.void(n), codegen
