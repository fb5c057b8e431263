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
