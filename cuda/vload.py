"""Vector loads and stores: ld.global.v2 / v4 and st.global.v4 in one instruction each.

    load2(a, idx) -> (a[idx], a[idx + 1])                  a of a 32- or 64-bit dtype
    load4(a, idx) -> (a[idx], ..., a[idx + 3])             a of a 16- or 32-bit dtype
    store4(a, idx, v0, v1, v2, v3): a[idx + k] = vk        a of a 16- or 32-bit dtype
    red_add4(a, idx, v0, v1, v2, v3): a[idx + k] += vk     a float32, atomically (a gradient many threads add to)
    (idx + k: along the last axis; the element at idx must be aligned to the whole vector's size)

Numba emits one memory instruction per element; a kernel that must keep many bytes in flight per
thread (a batch-1 GEMV reading 16 weight rows at once, a LayerNorm holding its row) runs out of
load slots before it runs out of bandwidth. As numba-cuda's own cache-hint loads, these are inline
PTX in an intrinsic. Plain (coherent) loads: a kernel may read what it later writes (LayerNorm's
dx); on Hopper the read-only `.nc` path shares the L1 with them anyway. The simulator runs plain
indexing.
"""

from __future__ import annotations

import koifish_cuda.compat  # noqa: F401
from numba import config, types


def aligned(a, elements: int) -> bool:
    """Every vector of `elements` items a kernel would load from a along its last axis is one aligned
    block of memory: the last axis is unit-stride, and the first element and every row start sit on a
    boundary of the vector's size (a CuPy, Numba or NumPy array)."""
    size = elements * a.dtype.itemsize
    if a.ndim and a.shape[-1] > 1 and a.strides[-1] != a.dtype.itemsize:
        return False
    iface = getattr(a, "__cuda_array_interface__", None)
    ptr = iface["data"][0] if iface else a.ctypes.data
    return ptr % size == 0 and all(s % size == 0 for s in a.strides[:-1])


if config.ENABLE_CUDASIM:

    def _at(idx, k):
        return (*idx[:-1], idx[-1] + k) if isinstance(idx, tuple) else idx + k

    def load2(a, idx):
        return a[idx], a[_at(idx, 1)]

    def load4(a, idx):
        return a[idx], a[_at(idx, 1)], a[_at(idx, 2)], a[_at(idx, 3)]

    def store4(a, idx, v0, v1, v2, v3):
        for k, v in enumerate((v0, v1, v2, v3)):
            a[_at(idx, k)] = v

    import threading

    _RED_LOCK = threading.Lock()  # the simulator's threads are Python threads

    def red_add4(a, idx, v0, v1, v2, v3):
        with _RED_LOCK:
            for k, v in enumerate((v0, v1, v2, v3)):
                a[_at(idx, k)] += v

else:
    from llvmlite import ir
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic

    def _register(dtype):
        """(PTX constraint letter, PTX type) of a register holding one element."""
        if dtype == types.float32:
            return "f", "f32"
        if dtype == types.float64:
            return "d", "f64"
        return {16: "h", 32: "r", 64: "l"}[dtype.bitwidth], f"u{dtype.bitwidth}"

    def _pointer(context, builder, aty, ity, arr_value, idx_value):
        arr = context.make_array(aty)(context, builder, value=arr_value)
        if isinstance(ity, types.BaseTuple):
            inds = [context.cast(builder, v, t, types.intp)
                    for v, t in zip(cgutils.unpack_tuple(builder, idx_value, ity.count), ity.types)]
        else:
            inds = [context.cast(builder, idx_value, ity, types.intp)]
        return cgutils.get_item_pointer(context, builder, aty, arr, inds, wraparound=False)

    def _vector_load(n: int, widths):
        def typer(typingctx, a, idx):
            if not isinstance(a, types.Array) or a.dtype.bitwidth not in widths:
                return None  # Numba reports no matching signature
            ret = types.UniTuple(a.dtype, n)

            def codegen(context, builder, sig, args):
                aty, ity = sig.args
                ptr = _pointer(context, builder, aty, ity, args[0], args[1])
                elt = context.get_value_type(aty.dtype)
                letter, ptx = _register(aty.dtype)
                outs = ", ".join(f"${k}" for k in range(n))
                asm = ir.InlineAsm(ir.FunctionType(ir.LiteralStructType([elt] * n), [ptr.type]),
                                   f"ld.global.v{n}.{ptx} {{{outs}}}, [${n}];", ",".join([f"={letter}"] * n) + ",l")
                res = builder.call(asm, [ptr])
                return context.make_tuple(builder, ret, [builder.extract_value(res, k) for k in range(n)])

            return ret(a, idx), codegen

        typer.__name__ = f"load{n}"  # the intrinsic's name
        return intrinsic(typer)

    load2 = _vector_load(2, (32, 64))
    load4 = _vector_load(4, (16, 32))

    @intrinsic
    def store4(typingctx, a, idx, v0, v1, v2, v3):
        if not isinstance(a, types.Array) or a.dtype.bitwidth not in (16, 32):
            return None

        def codegen(context, builder, sig, args):
            aty, ity = sig.args[:2]
            ptr = _pointer(context, builder, aty, ity, args[0], args[1])
            vals = [context.cast(builder, v, t, aty.dtype) for v, t in zip(args[2:], sig.args[2:])]
            letter, ptx = _register(aty.dtype)
            elt = context.get_value_type(aty.dtype)
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [ptr.type] + [elt] * 4),
                               f"st.global.v4.{ptx} [$0], {{$1, $2, $3, $4}};",
                               "l," + ",".join([letter] * 4) + ",~{memory}", side_effect=True)
            builder.call(asm, [ptr] + vals)
            return context.get_dummy_value()

        return types.void(a, idx, v0, v1, v2, v3), codegen

    @intrinsic
    def red_add4(typingctx, a, idx, v0, v1, v2, v3):
        """One red.global.add.v4.f32 on sm_90 and later (a quarter of the atomic instructions), else four
        scalar reds; the result is not returned (reductions, not atomics that read back)."""
        if not isinstance(a, types.Array) or a.dtype != types.float32:
            return None

        def codegen(context, builder, sig, args):
            from koifish_cuda.compat import compiles_for

            aty, ity = sig.args[:2]
            ptr = _pointer(context, builder, aty, ity, args[0], args[1])
            vals = [context.cast(builder, v, t, aty.dtype) for v, t in zip(args[2:], sig.args[2:])]
            text = ("red.global.add.v4.f32 [$0], {$1, $2, $3, $4};" if compiles_for((9, 0)) else
                    " ".join(f"red.global.add.f32 [$0+{4 * k}], ${k + 1};" for k in range(4)))
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [ptr.type] + [ir.FloatType()] * 4), text,
                               "l,f,f,f,f,~{memory}", side_effect=True)
            builder.call(asm, [ptr] + vals)
            return context.get_dummy_value()

        return types.void(a, idx, v0, v1, v2, v3), codegen
