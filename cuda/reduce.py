"""Block- and warp-wide reductions shared by the row kernels (layernorm, softmax, classifier, norms).

A block reduction is a shared-memory tree; a warp reduction is shuffles on a GPU. Numba's CUDA
simulator, used in CI, has neither shfl nor syncwarp: there the warp functions go through shared
memory with syncthreads. Callers keep to what works in both: every thread of the block calls a
reduction (or sync_warp) the same number of times; blockDim is a power of two, at least 32, and
buf holds blockDim floats (THREADS, the row kernels' block, unless a kernel says otherwise).
"""

import koifish_cuda.compat  # noqa: F401
from numba import config, cuda, float32

THREADS = 128  # threads per block of every row kernel; a power of two
WARPS = THREADS // 32
NEG_INF = float32(-3.0e38)

if config.ENABLE_CUDASIM:

    @cuda.jit(device=True)
    def _warp_reduce(v, buf, take_max):
        t = cuda.threadIdx.x
        buf[t] = v
        cuda.syncthreads()
        base = t - t % 32
        r = buf[base]
        for i in range(1, 32):
            r = max(r, buf[base + i]) if take_max else r + buf[base + i]
        cuda.syncthreads()
        return r

    @cuda.jit(device=True)
    def sync_warp():
        cuda.syncthreads()

    @cuda.jit(device=True)
    def shfl_xor(v, off, buf):
        t = cuda.threadIdx.x
        buf[t] = v
        cuda.syncthreads()
        r = buf[t ^ off]
        cuda.syncthreads()
        return r

else:

    @cuda.jit(device=True, inline=True)
    def _warp_reduce(v, buf, take_max):  # buf is unused on a GPU
        for off in (16, 8, 4, 2, 1):
            o = cuda.shfl_xor_sync(0xFFFFFFFF, v, off)
            v = max(v, o) if take_max else v + o
        return v

    @cuda.jit(device=True, inline=True)
    def sync_warp():
        cuda.syncwarp(0xFFFFFFFF)

    @cuda.jit(device=True, inline=True)
    def shfl_xor(v, off, buf):  # buf is unused on a GPU
        return cuda.shfl_xor_sync(0xFFFFFFFF, v, off)


shfl_xor.__doc__ = """v of lane (this lane xor off) of the warp (float32; off < 32; the whole warp calls it)."""


@cuda.jit(device=True)
def warp_sum(v, buf):
    """Sum of v over the calling thread's warp, returned to every lane."""
    return _warp_reduce(v, buf, False)


@cuda.jit(device=True)
def warp_max(v, buf):
    return _warp_reduce(v, buf, True)


@cuda.jit(device=True)
def _block_reduce(v, buf, take_max):
    """A shared-memory tree over blockDim threads (blockDim a power of two). Its order of additions
    is the one the training kernels' error bounds were fitted to, so it stays a tree on the GPU."""
    t = cuda.threadIdx.x
    buf[t] = v
    cuda.syncthreads()
    s = cuda.blockDim.x // 2
    while s > 0:
        if t < s:
            if not take_max:
                buf[t] += buf[t + s]
            elif buf[t + s] > buf[t]:
                buf[t] = buf[t + s]
        cuda.syncthreads()
        s //= 2
    r = buf[0]
    cuda.syncthreads()  # buf is reused by the next reduction
    return r


@cuda.jit(device=True)
def block_sum(v, buf):
    return _block_reduce(v, buf, False)


@cuda.jit(device=True)
def block_max(v, buf):
    return _block_reduce(v, buf, True)


@cuda.jit(device=True)
def block_reduce_warps(v, buf, wbuf, take_max):
    """A reduction over a block of up to 1024 threads by warps: shuffles in each warp, the warps'
    results through wbuf (32 floats), shuffles again; two barriers, where the shared-memory tree
    of a 1024-thread block takes ten. Every thread gets the result. buf: as warp_sum's."""
    v = _warp_reduce(v, buf, take_max)
    lane, warp = cuda.threadIdx.x % 32, cuda.threadIdx.x // 32
    if lane == 0:
        wbuf[warp] = v
    cuda.syncthreads()
    r = wbuf[lane] if lane < cuda.blockDim.x // 32 else (NEG_INF if take_max else float32(0.0))
    r = _warp_reduce(r, buf, take_max)
    cuda.syncthreads()  # wbuf is reused by the next reduction
    return r
