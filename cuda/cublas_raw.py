"""cuBLAS called directly (ctypes), on a handle bound to one stream for good.

CuPy's cuBLAS wrappers re-bind the stream on every call and refuse to do that while a stream is
being captured ("calling cuBLAS API during stream capture is currently unsupported"), so GEMMs
inside a CUDA graph go through this handle instead. The library is the one CuPy already loaded.
"""

from __future__ import annotations

import ctypes

CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_TF32_TENSOR_OP_MATH = 3
_SONAMES = ("libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so")


def _load():
    import cupy as cp

    cp.cuda.device.get_cublas_handle()  # makes CuPy load its cuBLAS; dlopen below then finds it
    for name in _SONAMES:
        try:
            return ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
    raise OSError(f"cannot find cuBLAS (tried {', '.join(_SONAMES)})")


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLAS {what} failed with status {status}")


class Cublas:
    """A cuBLAS handle fixed to `stream` with its own workspace; TF32 math for float32."""

    def __init__(self, stream, tf32: bool = True, workspace_bytes: int = 64 << 20):
        import cupy as cp

        lib = self.lib = _load()
        self.handle = ctypes.c_void_p()
        _check(lib.cublasCreate_v2(ctypes.byref(self.handle)), "create")
        _check(lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream.ptr)), "set stream")
        # A workspace of our own: cuBLAS must not allocate while a graph is being captured.
        self.workspace = cp.empty(workspace_bytes, dtype=cp.uint8)
        _check(lib.cublasSetWorkspace_v2(self.handle, ctypes.c_void_p(self.workspace.data.ptr),
                                         ctypes.c_size_t(workspace_bytes)), "set workspace")
        if tf32:
            _check(lib.cublasSetMathMode(self.handle, CUBLAS_TF32_TENSOR_OP_MATH), "set math mode")
        self._sgemm = lib.cublasSgemm_v2
        self._sgemm.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int]
        self._batched = lib.cublasSgemmStridedBatched
        self._batched.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong,
                                  ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.POINTER(ctypes.c_float),
                                  ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_int]

    def gemm(self, out, a, b, trans_a=False, trans_b=False, alpha=1.0, beta=0.0):
        """Row-major float32: out (M, N) = alpha op(a) op(b) + beta out."""
        M, N = out.shape
        K = a.shape[0] if trans_a else a.shape[1]
        # row-major out = op(a) op(b)  <=>  column-major out^T = op(b)^T op(a)^T
        _check(self._sgemm(self.handle, CUBLAS_OP_T if trans_b else CUBLAS_OP_N, CUBLAS_OP_T if trans_a else CUBLAS_OP_N,
                           N, M, K, ctypes.byref(ctypes.c_float(alpha)), b.data.ptr, b.shape[1], a.data.ptr, a.shape[1],
                           ctypes.byref(ctypes.c_float(beta)), out.data.ptr, N), "sgemm")
        return out

    def batched_gemm(self, out, a, b, trans_a=False, trans_b=False, alpha=1.0, beta=0.0):
        """Row-major float32 over a leading batch axis; all three C-contiguous."""
        batch, M, N = out.shape
        K = a.shape[1] if trans_a else a.shape[2]
        _check(self._batched(self.handle, CUBLAS_OP_T if trans_b else CUBLAS_OP_N,
                             CUBLAS_OP_T if trans_a else CUBLAS_OP_N, N, M, K, ctypes.byref(ctypes.c_float(alpha)),
                             b.data.ptr, b.shape[2], b.shape[1] * b.shape[2], a.data.ptr, a.shape[2],
                             a.shape[1] * a.shape[2], ctypes.byref(ctypes.c_float(beta)), out.data.ptr, N, M * N,
                             batch), "sgemmStridedBatched")
        return out

    def close(self) -> None:
        if self.handle:
            self.lib.cublasDestroy_v2(self.handle)
            self.handle = ctypes.c_void_p()
