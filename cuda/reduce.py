"""Block-wide reductions shared by the row kernels (layernorm, softmax, classifier, norms).

Shared memory and syncthreads only, no warp shuffles, so the same kernels also run under
Numba's CUDA simulator (which has neither shfl nor syncwarp) in CI.
"""

import koifish_cuda.compat  # noqa: F401
from numba import cuda, float32

THREADS = 128  # threads per block of every row kernel; a power of two


@cuda.jit(device=True)
def block_sum(v, buf):
    t = cuda.threadIdx.x
    buf[t] = v
    cuda.syncthreads()
    s = THREADS // 2
    while s > 0:
        if t < s:
            buf[t] += buf[t + s]
        cuda.syncthreads()
        s //= 2
    total = buf[0]
    cuda.syncthreads()  # buf is reused by the next reduction
    return total


@cuda.jit(device=True)
def block_max(v, buf):
    t = cuda.threadIdx.x
    buf[t] = v
    cuda.syncthreads()
    s = THREADS // 2
    while s > 0:
        if t < s and buf[t + s] > buf[t]:
            buf[t] = buf[t + s]
        cuda.syncthreads()
        s //= 2
    m = buf[0]
    cuda.syncthreads()
    return m


NEG_INF = float32(-3.0e38)


# Warp-wide sums: shuffles on a GPU. The simulator has no shuffles, so there the same function
# goes through shared memory; it then needs every thread of the block to call it (the kernels do).
from numba import config  # noqa: E402

if config.ENABLE_CUDASIM:

    @cuda.jit(device=True)
    def warp_sum(v, buf):
        t = cuda.threadIdx.x
        buf[t] = v
        cuda.syncthreads()
        base = t - t % 32
        s = float32(0.0)
        for i in range(32):
            s += buf[base + i]
        cuda.syncthreads()
        return s

else:

    @cuda.jit(device=True)
    def warp_sum(v, buf):  # buf is unused on a GPU
        for off in (16, 8, 4, 2, 1):
            v += cuda.shfl_xor_sync(0xFFFFFFFF, v, off)
        return v
