"""Weights pulled into L2 by spare blocks of the small kernel before a GEMV (PTX `prefetch.global.L2`).

A decode step alternates a bandwidth-bound GEMV with small latency-bound kernels (RMSNorm, the
attention merge, SwiGLU) during which the memory bus sits nearly idle. A small kernel launched with
`prefetch_blocks(words, threads)` extra blocks has those blocks call `prefetch_share(words, i)`:
each thread issues prefetches of its 128-byte lines of `words` (the first bytes of the next GEMV's
packed weights, a 1-D uint32 view) and exits; the lines arrive in L2 while the small kernel's own
block(s) run, and the GEMV after it finds them there. A prefetch changes no value; it adds no graph
node. The simulator has no L2: there prefetch_l2 does nothing (the spare blocks still run).

    prefetch_l2(a, i)                 the 128-byte line of a 1-D array holding a[i], towards L2
    prefetch_share(words, i, n)       spare block i (of n)'s lines of words (block-strided over the spares)
    prefetch_blocks(words, threads)   how many spare blocks a launch adds (0 for an empty words)
    no_prefetch(like)                 a one-word uint32 array of like's array module: no line, no spare block
    lines_or_none(prefetch, like)     a launcher's prefetch argument as its kernel takes it (None: no_prefetch)
"""

from __future__ import annotations

import numpy as np

import koifish_cuda.compat  # noqa: F401
from numba import config, cuda, types

LINE_WORDS = 32  # uint32 words of a 128-byte line
MAX_BLOCKS = 128  # spare blocks at most: spread over the SMs (the small kernels leave them idle), so that no
# SM queues more than a few thousand lines (an SM holds only so many misses in flight)

if config.ENABLE_CUDASIM:

    def prefetch_l2(a, i):
        pass

else:
    from llvmlite import ir
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic

    @intrinsic
    def prefetch_l2(typingctx, a, i):
        if not isinstance(a, types.Array) or a.ndim != 1 or not isinstance(i, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            aty, ity = sig.args
            arr = context.make_array(aty)(context, builder, value=args[0])
            idx = context.cast(builder, args[1], ity, types.intp)
            ptr = cgutils.get_item_pointer(context, builder, aty, arr, [idx], wraparound=False)
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [ptr.type]), "prefetch.global.L2 [$0];", "l",
                               side_effect=True)
            builder.call(asm, [ptr])
            return context.get_dummy_value()

        return types.void(a, i), codegen


@cuda.jit(device=True, inline=True)
def prefetch_share(words, i, n):
    """Spare block i of n prefetches lines i*blockDim + t, strided by all the spares' threads."""
    lines = words.shape[0] // LINE_WORDS
    step = n * cuda.blockDim.x
    for line in range(i * cuda.blockDim.x + cuda.threadIdx.x, lines, step):
        prefetch_l2(words, line * LINE_WORDS)


def prefetch_blocks(words, threads: int) -> int:
    """Spare blocks of `threads` threads a launch adds for words: about one line a thread, MAX_BLOCKS at most."""
    lines = words.shape[0] // LINE_WORDS
    return min(MAX_BLOCKS, -(-lines // threads))


_EMPTY: dict = {}


def no_prefetch(like):
    """A one-word uint32 array of like's array module (CuPy or NumPy): no whole line, so no spare block
    (one word, not none: a zero-size CuPy array has no device pointer to pass)."""
    xp = type(like).__module__.split(".")[0]
    if xp not in _EMPTY:
        _EMPTY[xp] = __import__(xp).zeros(1, np.uint32)
    return _EMPTY[xp]


def lines_or_none(prefetch, like):
    """What a launcher passes its kernel: prefetch (a 1-D uint32 array), or no_prefetch(like) for None."""
    return no_prefetch(like) if prefetch is None else prefetch


def weight_lines(words, nbytes: int):
    """The first nbytes (whole lines, one at least) of a GEMV's packed weights words (N, K/8) uint32,
    C-contiguous, as a 1-D view; None when they hold no whole line."""
    flat = words.reshape(-1)
    n = min(flat.shape[0], max(nbytes // 4, LINE_WORDS)) // LINE_WORDS * LINE_WORDS
    return flat[:n] if n else None
