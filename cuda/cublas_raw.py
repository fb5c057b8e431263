"""cuBLAS called directly (ctypes), on a handle bound to one stream for good.

CuPy's cuBLAS wrappers re-bind the stream on every call and refuse to do that while a stream is
being captured ("calling cuBLAS API during stream capture is currently unsupported"), so GEMMs
inside a CUDA graph go through this handle instead. The library is the one CuPy already loaded.
"""

from __future__ import annotations

import ctypes

import numpy as np

CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_TF32_TENSOR_OP_MATH = 3
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
CUBLAS_GEMM_DEFAULT = -1
# cudaDataType of each array dtype the engines hand cuBLAS; bf16 travels as uint16 bits (koifish_cuda.bf16)
CUDA_TYPES = {"float32": 0, "float16": 2, "uint16": 14}
_SONAMES = ("libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so")


def load_library(sonames, what: str):
    """The first of sonames that loads: CuPy's own copy once CuPy has loaded its cuBLAS (and with it
    cuBLASLt), which the call below makes it do."""
    import cupy as cp

    cp.cuda.device.get_cublas_handle()
    for name in sonames:
        try:
            return ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
    raise OSError(f"cannot find {what} (tried {', '.join(sonames)})")


def compute_type(tf32: bool, operands: str) -> int:
    """cuBLAS compute type for operands of this dtype name: float32 accumulation, TF32 products for
    float32 operands when allowed."""
    return CUBLAS_COMPUTE_32F_FAST_TF32 if tf32 and operands == "float32" else CUBLAS_COMPUTE_32F


def check_types(a, b, out) -> None:
    """The type combinations cuBLAS GemmEx takes with float32 compute: operands alike, the product in
    their type or float32 (fp16 operands cannot give a bf16 product, nor the other way round)."""
    if a.dtype != b.dtype or a.dtype.name not in CUDA_TYPES or out.dtype not in (a.dtype, np.float32):
        raise TypeError(f"matmul: operands {a.dtype} and {b.dtype} into {out.dtype}: expected operands of one type "
                        f"(float32, float16 or uint16 bf16) and the product in that type or float32")


_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.POINTER(ctypes.c_float)
_HEAD = [_P, _I, _I, _I, _I, _I, _F]  # handle, op_a, op_b, m, n, k, alpha
_ARGTYPES = {  # then per operand: pointer, [cudaDataType,] leading dimension[, batch stride]; beta before C
    "cublasSgemmStridedBatched": _HEAD + [_P, _I, _L, _P, _I, _L, _F, _P, _I, _L, _I],
    "cublasGemmEx": _HEAD + [_P, _I, _I, _P, _I, _I, _F, _P, _I, _I, _I, _I],  # ..., compute type, algo
    "cublasGemmStridedBatchedEx": _HEAD + [_P, _I, _I, _L, _P, _I, _I, _L, _F, _P, _I, _I, _L, _I, _I, _I],
}


def _bind(lib, name: str):
    fn = getattr(lib, name)
    fn.argtypes = _ARGTYPES[name]
    return fn


def _ld(x) -> int:
    """Leading dimension (row stride in elements) of a row-major matrix view with unit column stride."""
    if x.strides[-1] != x.itemsize:
        raise ValueError(f"matmul: operand {x.shape} has column stride {x.strides[-1]} bytes, needs {x.itemsize}")
    return max(x.strides[-2] // x.itemsize, x.shape[-1])


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLAS {what} failed with status {status}")


class Cublas:
    """A cuBLAS handle fixed to `stream` with its own workspace; TF32 math for float32."""

    def __init__(self, stream, tf32: bool = True, workspace_bytes: int = 64 << 20):
        import cupy as cp

        lib = self.lib = load_library(_SONAMES, "cuBLAS")
        self.handle = ctypes.c_void_p()
        _check(lib.cublasCreate_v2(ctypes.byref(self.handle)), "create")
        _check(lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream.ptr)), "set stream")
        # A workspace of our own: cuBLAS must not allocate while a graph is being captured.
        self.workspace = cp.empty(workspace_bytes, dtype=cp.uint8)
        _check(lib.cublasSetWorkspace_v2(self.handle, ctypes.c_void_p(self.workspace.data.ptr),
                                         ctypes.c_size_t(workspace_bytes)), "set workspace")
        if tf32:
            _check(lib.cublasSetMathMode(self.handle, CUBLAS_TF32_TENSOR_OP_MATH), "set math mode")
        self._batched = _bind(lib, "cublasSgemmStridedBatched")
        self._gemm_ex, self._batched_ex = _bind(lib, "cublasGemmEx"), _bind(lib, "cublasGemmStridedBatchedEx")
        self.tf32 = tf32

    def matmul(self, out, a, b, trans_b: bool = True, alpha: float = 1.0, beta: float = 0.0):
        """out = alpha a @ op(b) + beta out, row-major, op(b) = b.T if trans_b. 2-D (M, K) @ (N, K).T, or
        3-D with a leading batch axis (any batch strides, including views into a larger buffer). Each
        matrix needs unit column stride; dtypes float32, float16 or uint16 (bf16 bits), a and b alike;
        out float32 or the inputs' type; accumulation in float32 (TF32 for float32 inputs if enabled)."""
        if out.ndim == 2:
            return self.gemm(out, a, b, trans_b=trans_b, alpha=alpha, beta=beta)
        M, N = out.shape[-2:]
        K = a.shape[-1]
        check_types(a, b, out)
        types = [CUDA_TYPES[x.dtype.name] for x in (a, b, out)]
        compute = compute_type(self.tf32, a.dtype.name)
        ld = [_ld(x) for x in (b, a, out)]
        al, be = ctypes.byref(ctypes.c_float(alpha)), ctypes.byref(ctypes.c_float(beta))
        op_b = CUBLAS_OP_T if trans_b else CUBLAS_OP_N
        # row-major out = a op(b)  <=>  column-major out^T = op(b)^T a^T
        st = [x.strides[0] // x.itemsize for x in (b, a, out)]
        _check(self._batched_ex(self.handle, op_b, CUBLAS_OP_N, N, M, K, al, b.data.ptr, types[1], ld[0], st[0],
                                a.data.ptr, types[0], ld[1], st[1], be, out.data.ptr, types[2], ld[2], st[2],
                                out.shape[0], compute, CUBLAS_GEMM_DEFAULT), "gemmStridedBatchedEx")
        return out

    def gemm(self, out, a, b, trans_a=False, trans_b=False, alpha=1.0, beta=0.0):
        """Row-major 2-D: out (M, N) = alpha op(a) op(b) + beta out; the dtypes as matmul's (the
        training engine's bf16 GEMMs: bf16 operands, the product in bf16 or float32)."""
        M, N = out.shape
        K = a.shape[0] if trans_a else a.shape[1]
        check_types(a, b, out)
        ta, tb, to = (CUDA_TYPES[x.dtype.name] for x in (a, b, out))
        compute = compute_type(self.tf32, a.dtype.name)
        # row-major out = op(a) op(b)  <=>  column-major out^T = op(b)^T op(a)^T
        _check(self._gemm_ex(self.handle, CUBLAS_OP_T if trans_b else CUBLAS_OP_N, CUBLAS_OP_T if trans_a else CUBLAS_OP_N,
                             N, M, K, ctypes.byref(ctypes.c_float(alpha)), b.data.ptr, tb, _ld(b), a.data.ptr, ta, _ld(a),
                             ctypes.byref(ctypes.c_float(beta)), out.data.ptr, to, _ld(out), compute, CUBLAS_GEMM_DEFAULT),
               "gemmEx")
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


class NumpyBlas:
    """Cublas.matmul on NumPy arrays: the reference of its semantics, and the engines' GEMMs under
    Numba's CUDA simulator. uint16 operands are bf16 bits; products accumulate in float64."""

    @staticmethod
    def matmul(out, a, b, trans_b: bool = True, alpha: float = 1.0, beta: float = 0.0):
        from koifish_cuda.bf16 import from_bf16_ref, to_bf16_ref

        check_types(a, b, out)

        def value(x):
            return from_bf16_ref(x).astype(np.float64) if x.dtype == np.uint16 else x.astype(np.float64)

        bb = value(b)
        prod = alpha * (value(a) @ (np.swapaxes(bb, -1, -2) if trans_b else bb))
        if beta:
            prod += beta * value(out)
        out[...] = to_bf16_ref(prod) if out.dtype == np.uint16 else prod
        return out
