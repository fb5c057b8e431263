"""cuBLAS GEMMs on row-major CuPy arrays, written into preallocated outputs (so they can be
captured in a CUDA graph: nothing here allocates).

    gemm(out, a, b, trans_a, trans_b, alpha, beta):          out = alpha op(a) op(b) + beta out
    batched_gemm(out, a, b, trans_a, trans_b, alpha, beta):  the same over a leading batch axis
fp32 arrays use TF32 tensor cores when `use_tf32()` was called (the engine does).
"""

from __future__ import annotations

import numpy as np

CUBLAS_TF32_TENSOR_OP_MATH = 3  # cublasMath_t; CuPy's cublas module does not export the name


def use_tf32(enabled: bool = True) -> None:
    import cupy as cp
    from cupy_backends.cuda.libs import cublas

    cublas.setMathMode(cp.cuda.device.get_cublas_handle(), CUBLAS_TF32_TENSOR_OP_MATH if enabled else 0)


def gemm(out, a, b, trans_a: bool = False, trans_b: bool = False, alpha: float = 1.0, beta: float = 0.0):
    import cupy.cublas

    return cupy.cublas.gemm("T" if trans_a else "N", "T" if trans_b else "N", a, b, out=out, alpha=alpha, beta=beta)


def batched_gemm(out, a, b, trans_a: bool = False, trans_b: bool = False, alpha: float = 1.0, beta: float = 0.0):
    """Row-major (batch, M, K) x (batch, K, N); all three arrays C-contiguous float32."""
    import cupy as cp
    from cupy_backends.cuda.libs import cublas

    batch = out.shape[0]
    M, N = out.shape[1], out.shape[2]
    K = a.shape[1] if trans_a else a.shape[2]
    # Row-major out = op(a) op(b) is column-major out^T = op(b)^T op(a)^T: swap the operands.
    op_a = cublas.CUBLAS_OP_T if trans_a else cublas.CUBLAS_OP_N
    op_b = cublas.CUBLAS_OP_T if trans_b else cublas.CUBLAS_OP_N
    al, be = np.array(alpha, np.float32), np.array(beta, np.float32)
    handle = cp.cuda.device.get_cublas_handle()
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    cublas.sgemmStridedBatched(handle, op_b, op_a, N, M, K, al.ctypes.data,
                               b.data.ptr, b.shape[2], b.shape[1] * b.shape[2],
                               a.data.ptr, a.shape[2], a.shape[1] * a.shape[2],
                               be.ctypes.data, out.data.ptr, N, M * N, batch)
    return out
