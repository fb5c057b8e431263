"""Programmatic dependent launch (Hopper's PDL): a kernel starts while the one before it drains.

In a captured decode step, ~600 small dependent kernels run back to back, and each boundary costs the
time from the last block of one kernel retiring to the first block of the next one running. A kernel
launched with the programmatic-stream-serialization attribute may be scheduled as soon as every block
of the kernel before it has called `launch_dependents()`; it calls `wait()` before it reads anything
that kernel wrote, and `wait()` returns once the previous kernel has completed and its writes are
visible. The blocks are resident and waiting when the previous kernel ends, so the boundary costs
only the wait's release. Stream capture records the attribute as a programmatic edge of the graph.

    wait()                   PTX griddepcontrol.wait (sm_90+; nothing on older GPUs and in the simulator)
    launch_dependents()      PTX griddepcontrol.launch_dependents (alike)
    aware(kernel)            marks a @cuda.jit kernel whose every thread calls wait() before its first
                             read of a previous kernel's output; returns it
    programmatic(on=True)    context manager: aware kernels launched inside get the attribute; all
                             others launch as usual (they wait for the whole previous kernel)
    available()              whether launches can carry the attribute here (sm_90+ and cuda.core's
                             LaunchConfig has programmatic_stream_serialization)

Why every aware kernel waits at its top: a kernel that ended without waiting could end before the
kernel before it, and the one after it, waiting only on it, would read unfinished data. Each aware
kernel calls launch_dependents() after its wait, so at most the running kernel and the next one are
in flight: the next one's blocks can never hold the SM slots the running one still needs.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import koifish_cuda.compat  # noqa: F401
from numba import config, cuda, types

# measurement knobs (compile-time; set before the first kernel compiles, with a NUMBA_CACHE_DIR of their own):
# KOIFISH_PDL_TRIGGER: which kernels let their dependents launch right after their own wait ("all", "small":
# those begun with begin_early(), the one-block norm, SwiGLU and attention merge), "none": at their end
_TRIGGER = os.environ.get("KOIFISH_PDL_TRIGGER", "none")
TRIGGER_ALL, TRIGGER_SMALL = _TRIGGER == "all", _TRIGGER in ("all", "small")

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

    def launch_dependents():
        pass

else:
    from llvmlite import ir
    from numba.cuda.extending import intrinsic

    def _sm90() -> bool:
        try:
            return cuda.get_current_device().compute_capability >= (9, 0)
        except Exception:  # no device: compile for what ptxas is asked (compile_ptx tests pass cc)
            return True

    def _griddep(op: str):
        def typer(typingctx):
            def codegen(context, builder, sig, args):
                if _sm90():
                    asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), f"griddepcontrol.{op};", "~{memory}",
                                       side_effect=True)
                    builder.call(asm, [])
                return context.get_dummy_value()

            return types.void(), codegen

        return intrinsic(typer)

    wait = _griddep("wait")
    launch_dependents = _griddep("launch_dependents")


def available() -> bool:
    if config.ENABLE_CUDASIM:
        return False
    try:
        from numba.cuda import dispatcher

        dispatcher.LaunchConfig(grid=1, block=1, programmatic_stream_serialization=True)
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
    if TRIGGER_ALL:
        launch_dependents()


@cuda.jit(device=True, inline=True)
def begin_early():
    """begin() for a short kernel: the next kernel (a GEMV) may launch while this one runs."""
    wait()
    if TRIGGER_SMALL:
        launch_dependents()
