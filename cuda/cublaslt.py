"""cuBLASLt GEMMs with fused epilogues (ctypes), on a handle-free library bound per call to one stream.

The training engine's linear layers do more than a product: a bias, a residual add, GELU (and its
pre-activation kept for the backward), GELU's derivative. cuBLASLt applies these in the GEMM's
epilogue while the tile is still in registers, so none of them is a pass over memory of its own:

    linear:        out = x @ W.T + bias [+ resid]                  (EPILOGUE_BIAS, beta=1 with C=resid)
    linear + GELU: out = gelu(pre), pre = x @ W.T + bias kept      (EPILOGUE_GELU_AUX_BIAS)
    dGELU:         dpre = (dout @ W) * gelu'(pre)                  (EPILOGUE_DGELU)

GELU is the tanh approximation, as GPT-2's. Row-major operands (views with unit column stride);
row-major out = op(a) op(b) is column-major out^T = op(b)^T op(a)^T, so a bias along out's columns
is cuBLASLt's bias along D's rows and the aux matrix has out's layout. (Its bias-gradient
epilogues, BGRADB and DGELU_BGRAD, were tried for the engine's bias gradients and measured slower
than the passes they would replace: bench/RESULTS.md, session 13.) Plans (descriptors and the
algorithm) are cached per shape, so a graph re-capture costs no heuristic calls. The algorithm
is tuned on first use outside a graph capture: the heuristic's first `tune` candidates are each
timed on the call's own operands (into a scratch output) and the fastest kept; the heuristic's
first pick alone ran the fused GEMMs of GPT-2 124M at ~490 TFLOP/s on an H200.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from koifish_cuda.cublas_raw import (CUBLAS_OP_N, CUBLAS_OP_T, CUDA_TYPES, _check, _ld, check_types, compute_type,
                                     load_library)

_SONAMES = ("libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so.11", "libcublasLt.so")
# cublasLtMatmulDescAttributes_t, cublasLtEpilogue_t, cublasLtMatmulPreferenceAttributes_t
DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE, DESC_BIAS_POINTER = 3, 4, 7, 8
DESC_AUX_POINTER, DESC_AUX_LD, DESC_BIAS_DATA_TYPE = 11, 12, 26
EPILOGUES = {"default": 1, "bias": 4, "gelu_aux_bias": 164, "dgelu": 192}
PREF_MAX_WORKSPACE_BYTES = 1
R_32F = 0  # cudaDataType of the scale (alpha, beta)
# candidate algorithms timed per shape. The weight gradients of narrow layers (768 x 768 x 16384: 36
# output tiles for 132 SMs) ran at 430-460 TFLOP/s with the first 8; the first 32 (split-K variants
# further down the heuristic's list) made no GEMM of GPT-2 124M faster on an H200 (bench/RESULTS.md,
# session 14). CublasLt(tune=...) measures others.
TUNE = 8


@dataclass
class _Plan:
    """One GEMM shape's descriptors and its candidate algorithms (one left once tuned)."""

    desc: ctypes.c_void_p
    a_lay: ctypes.c_void_p
    b_lay: ctypes.c_void_p
    d_lay: ctypes.c_void_p
    algos: list
    tuned: bool = False


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


_P, _I, _U64, _I64, _SZ = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
_ARGTYPES = {
    "cublasLtCreate": [_P],
    "cublasLtMatmulDescCreate": [_P, _I, _I],
    "cublasLtMatmulDescSetAttribute": [_P, _I, _P, _SZ],
    "cublasLtMatrixLayoutCreate": [_P, _I, _U64, _U64, _I64],
    "cublasLtMatmulPreferenceCreate": [_P],
    "cublasLtMatmulPreferenceSetAttribute": [_P, _I, _P, _SZ],
    "cublasLtMatmulPreferenceDestroy": [_P],
    "cublasLtMatmulAlgoGetHeuristic": [_P, _P, _P, _P, _P, _P, _P, _I, _P, _P],
    "cublasLtMatmul": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _SZ, _P],
}


def _load():
    lib = load_library(_SONAMES, "cuBLASLt")
    for fn, types in _ARGTYPES.items():
        getattr(lib, fn).argtypes = types
    return lib


class CublasLt:
    def __init__(self, stream, tf32: bool = True, workspace_bytes: int = 32 << 20, tune: int = TUNE):
        import cupy as cp

        self.lib, self.stream, self.tf32, self.tune = _load(), stream, tf32, tune
        # for measurement, set before the first GEMM of a shape: the workspace the heuristic may plan for
        # (None: all of it; 0 leaves out the algorithms that need one, split-K's and those whose calls add
        # a memset node to a captured graph), and candidates timed as graph replays (graph nodes' gaps and
        # the memsets some algorithms add counted) instead of back-to-back launches
        self.max_workspace: int | None = None
        self.tune_in_graph = False
        self.handle = ctypes.c_void_p()
        _check(self.lib.cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")
        self.workspace = cp.empty(workspace_bytes, dtype=cp.uint8)
        self._plans = {}

    def _attr(self, desc, attr, value, ctype) -> None:
        v = ctype(value)
        _check(self.lib.cublasLtMatmulDescSetAttribute(desc, attr, ctypes.cast(ctypes.byref(v), _P), ctypes.sizeof(v)),
               "desc attribute")

    def _layout(self, dtype, rows, cols, ld):
        lay = ctypes.c_void_p()
        _check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(lay), CUDA_TYPES[dtype], rows, cols, ld), "layout")
        return lay

    def _plan(self, key, m, n, k, op_a, op_b, ta, tb, td, lda, ldb, ldd, epilogue, bias_dtype, aux_ld):
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        lib = self.lib
        desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), compute_type(self.tf32, ta), R_32F), "desc")
        self._attr(desc, DESC_TRANSA, op_a, ctypes.c_int32)
        self._attr(desc, DESC_TRANSB, op_b, ctypes.c_int32)
        self._attr(desc, DESC_EPILOGUE, EPILOGUES[epilogue], ctypes.c_int32)
        if bias_dtype is not None:
            self._attr(desc, DESC_BIAS_DATA_TYPE, CUDA_TYPES[bias_dtype], ctypes.c_int32)
        if aux_ld:
            self._attr(desc, DESC_AUX_LD, aux_ld, ctypes.c_int64)
        a_lay = self._layout(ta, *((m, k) if op_a == CUBLAS_OP_N else (k, m)), lda)
        b_lay = self._layout(tb, *((k, n) if op_b == CUBLAS_OP_N else (n, k)), ldb)
        d_lay = self._layout(td, m, n, ldd)
        pref = ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        ws = ctypes.c_uint64(self.workspace.nbytes if self.max_workspace is None
                             else min(self.max_workspace, self.workspace.nbytes))
        _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE_BYTES, ctypes.cast(ctypes.byref(ws), _P),
                                                        ctypes.sizeof(ws)), "preference attribute")
        results, count = (_Heuristic * self.tune)(), ctypes.c_int(0)
        _check(lib.cublasLtMatmulAlgoGetHeuristic(self.handle, desc, a_lay, b_lay, d_lay, d_lay, pref, self.tune,
                                                  ctypes.cast(results, _P), ctypes.cast(ctypes.byref(count), _P)),
               "heuristic")
        lib.cublasLtMatmulPreferenceDestroy(pref)
        if count.value == 0:
            raise RuntimeError(f"cuBLASLt has no algorithm for {key}")
        plan = self._plans[key] = _Plan(desc, a_lay, b_lay, d_lay, list(results[:count.value]))
        return plan

    def _run(self, plan: _Plan, algo, a, b, src, out, beta) -> int:
        ref = lambda x: ctypes.cast(ctypes.byref(x), _P)  # noqa: E731
        one = ctypes.c_float(1.0)
        return self.lib.cublasLtMatmul(self.handle, plan.desc, ref(one), b.data.ptr, plan.a_lay, a.data.ptr, plan.b_lay,
                                       ref(beta), src.data.ptr, plan.d_lay, out.data.ptr, plan.d_lay, ref(algo.algo),
                                       self.workspace.data.ptr, self.workspace.nbytes, self.stream.ptr)

    def _tune(self, plan: _Plan, a, b, src, out, beta) -> None:
        """Keep the fastest of the plan's candidates, timed into a scratch copy of out."""
        import cupy as cp

        scratch = cp.empty_like(out)
        best = (float("inf"), plan.algos[0])
        for algo in plan.algos:
            if self._run(plan, algo, a, b, src, scratch, beta) != 0:
                continue  # a candidate that cannot run these operands
            graph = None
            if self.tune_in_graph:
                self.stream.begin_capture()
                for _ in range(3):
                    self._run(plan, algo, a, b, src, scratch, beta)
                graph = self.stream.end_capture()
                graph.launch(self.stream)  # the first replay uploads the graph
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            start.record(self.stream)
            if graph is not None:
                graph.launch(self.stream)
            else:
                for _ in range(3):
                    self._run(plan, algo, a, b, src, scratch, beta)
            stop.record(self.stream)
            stop.synchronize()
            best = min(best, (cp.cuda.get_elapsed_time(start, stop), algo), key=lambda t: t[0])
        plan.algos, plan.tuned = [best[1]], True

    def matmul(self, out, a, b, trans_a=False, trans_b=False, bias=None, epilogue="default", aux=None, c=None):
        """Row-major out (M, N) = op(a) op(b) with `epilogue`: 'default'; 'bias' (+ bias (N,)); 'gelu_aux_bias'
        (aux = op(a) op(b) + bias, out = gelu(aux)); 'dgelu' (out = (op(a) op(b)) * gelu'(aux)). c, if
        given (out's shape and dtype), is added (out = ... + c; c may be out itself). Operands alike
        (float32 or bf16 bits), out and aux float32 or the operands' type, bias out's type."""
        M, N = out.shape
        K = a.shape[0] if trans_a else a.shape[1]
        check_types(a, b, out)
        if (bias is not None) != ("bias" in epilogue) or (aux is not None) != ("gelu" in epilogue):
            raise ValueError(f"cublasLt epilogue {epilogue!r}: bias {bias is not None}, aux {aux is not None}")
        for name, x in (("aux", aux), ("c", c)):
            if x is not None and (x.shape != out.shape or x.dtype != out.dtype or _ld(x) != _ld(out)):
                raise ValueError(f"cublasLt: {name} {x.shape} {x.dtype} must be laid out as out {out.shape} {out.dtype}")
        if bias is not None and (bias.shape != (N,) or bias.dtype != out.dtype):
            raise ValueError(f"cublasLt: bias {bias.shape} {bias.dtype}, expected ({N},) {out.dtype}")
        # column-major D^T (N, M) = op(b)^T (N, K) op(a)^T (K, M)
        op_a, op_b = (CUBLAS_OP_T if trans_b else CUBLAS_OP_N), (CUBLAS_OP_T if trans_a else CUBLAS_OP_N)
        lda, ldb, ldd = _ld(b), _ld(a), _ld(out)
        key = (M, N, K, op_a, op_b, a.dtype.name, out.dtype.name, lda, ldb, ldd, epilogue)
        plan = self._plan(key, N, M, K, op_a, op_b, b.dtype.name, a.dtype.name, out.dtype.name, lda, ldb, ldd,
                          epilogue, None if bias is None else bias.dtype.name, ldd if aux is not None else 0)
        if bias is not None:
            self._attr(plan.desc, DESC_BIAS_POINTER, bias.data.ptr, ctypes.c_void_p)
        if aux is not None:
            self._attr(plan.desc, DESC_AUX_POINTER, aux.data.ptr, ctypes.c_void_p)
        beta = ctypes.c_float(0.0 if c is None else 1.0)
        src = out if c is None else c
        if not plan.tuned and not self.stream.is_capturing():
            self._tune(plan, a, b, src, out, beta)
        _check(self._run(plan, plan.algos[0], a, b, src, out, beta), "cublasLtMatmul")
        return out
