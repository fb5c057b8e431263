"""Programmatic dependent launch (Hopper's PDL): a kernel's launch overlaps the end of the one before it.

A captured decode step runs ~590 small dependent kernels back to back. A kernel launched with the
programmatic-stream-serialization attribute may be set up on the GPU before the kernel before it has
ended; it calls `wait()` before it reads anything, and `wait()` returns once that kernel has completed
and its writes are visible. Stream capture records the attribute as a programmatic edge of the graph.

    wait()                   PTX griddepcontrol.wait (sm_90+; nothing on older GPUs and in the simulator)
    begin()                  an aware kernel's first statement (wait())
    aware(kernel)            marks a @cuda.jit kernel whose every thread calls begin() first; returns it
    programmatic(on=True)    context manager: aware kernels launched inside get the attribute; all
                             others launch as usual (they wait for the whole previous kernel)
    available()              whether launches can carry the attribute here (sm_90+ and cuda.core's
                             LaunchConfig has programmatic_stream_serialization)

Why every aware kernel waits first: a kernel that ended without waiting could end before the kernel
before it, and the one after it, waiting only on it, would read unfinished data.

Measured on the H200 (Qwen3-32B shapes, 4-bit, stop 17): the decode step 124.6-125.0 -> 126.1-126.2
tokens/s at 1k context, 110.3-110.8 -> 111.8 at 8k. Tried and left out: griddepcontrol.launch_dependents
right after the wait in every kernel (the next kernel's blocks then sit on the SMs while a GEMV's last
wave runs: 123.5 against 124.8 without PDL) or only in the short kernels before a GEMV (equal to none),
and a GEMV loading its first weights before its wait (its loop then measured slower: 121.9 against 124.9).
"""

from __future__ import annotations

import contextlib
import contextvars

from koifish_cuda.compat import compiles_for
from numba import config, cuda, types

_ON = contextvars.ContextVar("koifish_pdl_on", default=False)  # inside programmatic()
_NOW = contextvars.ContextVar("koifish_pdl_now", default=False)  # the launch being made is an aware one
_PATCHED = []


def aware(kernel):
    """Marks kernel (a CUDA dispatcher) as PDL-aware; see the module docstring for the contract."""
    kernel._koifish_pdl = True
    return kernel


if config.ENABLE_CUDASIM:

    def wait():
        pass

else:
    from llvmlite import ir
    from numba.cuda.extending import intrinsic

    @intrinsic
    def wait(typingctx):
        def codegen(context, builder, sig, args):
            if compiles_for((9, 0)):  # the instruction exists from sm_90; before, there is nothing to wait for
                asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), "griddepcontrol.wait;", "~{memory}",
                                   side_effect=True)
                builder.call(asm, [])
            return context.get_dummy_value()

        return types.void(), codegen


def available() -> bool:
    if config.ENABLE_CUDASIM:
        return False
    try:
        from numba.cuda import dispatcher

        dispatcher.LaunchConfig(grid=1, block=1, programmatic_stream_serialization=True)
        dispatcher.CUDADispatcher.call  # noqa: B018  (what _patch wraps: another numba-cuda may lack it)
        return cuda.get_current_device().compute_capability >= (9, 0)
    except Exception:
        return False


def _patch() -> None:
    """Once: the dispatcher's launch marks aware kernels' launches, and its LaunchConfig adds the attribute
    to those (numba-cuda builds a cuda.core LaunchConfig for every launch; it has no attribute option)."""
    if _PATCHED:
        return
    from numba.cuda import dispatcher

    base_config, base_call = dispatcher.LaunchConfig, dispatcher.CUDADispatcher.call

    def launch_config(**kw):
        if _NOW.get():
            kw["programmatic_stream_serialization"] = True
        return base_config(**kw)

    def call(self, args, launch_config_):
        token = _NOW.set(_ON.get() and (getattr(self, "_koifish_pdl", False) or _NOW.get()))
        try:
            return base_call(self, args, launch_config_)
        finally:
            _NOW.reset(token)

    dispatcher.LaunchConfig, dispatcher.CUDADispatcher.call = launch_config, call
    _PATCHED.append(True)


@contextlib.contextmanager
def programmatic(on: bool = True):
    """Aware kernels launched inside carry the PDL attribute (when available(); else nothing changes)."""
    on = bool(on) and available()
    if on:
        _patch()
    token = _ON.set(on)
    try:
        yield on
    finally:
        _ON.reset(token)


@cuda.jit(device=True, inline=True)
def begin():
    """An aware kernel's first statement: wait for the previous kernel's writes."""
    wait()
