"""Programmatic dependent launch (koifish_cuda.pdl): aware kernels see every write of the kernels before
them, in a captured graph too, mixed with kernels that are not aware; on other GPUs and in the simulator
the same kernels run as usual."""

import numpy as np
import pytest
from numba import cuda

from koifish_cuda.pdl import available, aware, begin, programmatic
from tests.cuda_harness import dev, host


@aware
@cuda.jit
def slow_fill_kernel(buf, base, spin):  # many blocks, each writing late: a reader that ran early sees zeros
    begin()
    i = cuda.grid(1)
    if i < buf.shape[0]:
        v = base[0]
        for _ in range(spin):  # delay the write by a data-dependent loop the compiler keeps
            v = v * 1.0000001 + 1e-9
        buf[i] = i + base[0] + (v - v)


@aware
@cuda.jit
def add_one_kernel(out, buf):  # reads what the kernel before it wrote
    begin()
    i = cuda.grid(1)
    if i < buf.shape[0]:
        out[i] = buf[i] + 1.0


@cuda.jit
def plain_copy_kernel(out, buf):  # not aware: launched as usual inside programmatic() too
    i = cuda.grid(1)
    if i < buf.shape[0]:
        out[i] = buf[i]


def _chain(a, b, c, base, spin: int, rounds: int, stream=0):
    blocks = (a.shape[0] + 127) // 128
    for _ in range(rounds):
        slow_fill_kernel[blocks, 128, stream](a, base, spin)
        add_one_kernel[blocks, 128, stream](b, a)
        plain_copy_kernel[blocks, 128, stream](c, b)
        add_one_kernel[blocks, 128, stream](a, c)  # a = fill + 2, read back below
    return a


def test_aware_kernels_read_what_the_kernel_before_wrote():
    n, base = 256, dev(np.array([3.0], np.float32))
    a, b, c = (dev(np.zeros(n, np.float32)) for _ in range(3))
    with programmatic():
        got = host(_chain(a, b, c, base, spin=8, rounds=2))
    np.testing.assert_array_equal(got, np.arange(n, dtype=np.float32) + 3.0 + 2.0)


@pytest.mark.gpu
def test_programmatic_edges_in_a_captured_graph_keep_every_dependency():
    import cupy as cp

    if not available():
        pytest.skip("programmatic dependent launch needs sm_90 and a cuda.core with the attribute")
    n = 1 << 16
    base = cp.asarray(np.array([5.0], np.float32))
    stream = cp.cuda.Stream(non_blocking=True)
    nb_stream = cuda.external_stream(stream.ptr)
    a, b, c = (cp.zeros(n, np.float32) for _ in range(3))
    with stream, programmatic():
        _chain(a, b, c, base, spin=4, rounds=1, stream=nb_stream)  # compiled and run once eagerly
        stream.begin_capture()
        _chain(a, b, c, base, spin=2000, rounds=8, stream=nb_stream)
        graph = stream.end_capture()
    for value in (7.0, 11.0):  # replays with a changed input: each reads the fresh writes
        base[0] = value
        graph.launch(stream)
        stream.synchronize()
        np.testing.assert_array_equal(cp.asnumpy(a), np.arange(n, dtype=np.float32) + value + 2.0)


@pytest.mark.gpu
def test_wait_is_in_the_ptx_of_an_aware_kernel_on_hopper():
    if cuda.get_current_device().compute_capability < (9, 0):
        pytest.skip("griddepcontrol is sm_90+; older GPUs compile it out")
    add_one_kernel[1, 32](dev(np.zeros(32, np.float32)), dev(np.zeros(32, np.float32)))
    ptx = "".join(add_one_kernel.inspect_asm().values())
    assert "griddepcontrol.wait" in ptx
