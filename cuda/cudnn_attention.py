"""Causal self-attention through cuDNN's fused (flash) SDPA kernels, by NVIDIA's cudnn-frontend.

q, k and v are read in place from GPT-2's (B, T, 3C) qkv rows (head h of q at columns h*hs..,
of k at C + h*hs.., of v at 2C + h*hs..), the output is written into (B, T, C) rows and the
gradients into (B, T, 3C) rows of the same layout: no head split or merge copies, no (T, T)
score matrix in memory. bf16 in and out (uint16 bits, koifish_cuda.bf16), float32 inside; the
forward keeps each row's log-sum-exp (B, nh, T) for the backward. The reference is
attention.py's float64 NumPy attention (the same function the Numba kernels are checked with).
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import math
import os

from koifish_core.errors import KoifishError


def _preload_cudnn() -> None:
    """cudnn-frontend dlopens libcudnn from the interpreter's own site-packages; a wheel installed
    elsewhere (a --target folder, a user site) is found here and loaded first."""
    spec = importlib.util.find_spec("nvidia.cudnn") if importlib.util.find_spec("nvidia") else None
    for root in (spec.submodule_search_locations if spec else []):
        for path in sorted(glob.glob(os.path.join(root, "lib", "libcudnn.so.*[0-9]"))):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return


def import_cudnn():
    try:
        _preload_cudnn()
        import cudnn
    except (ImportError, OSError) as e:
        raise KoifishError(f"cuDNN attention needs cudnn-frontend and cuDNN 9 ({e}): pip install "
                           "nvidia-cudnn-frontend nvidia-cudnn-cu13 (or -cu12), or set model.attention to 'cublas'") from None
    return cudnn


def _build(graph, cudnn) -> None:
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()


class CausalAttention:
    """Forward and backward graphs for one (B, T, n_head, head_dim), bound to `stream`."""

    def __init__(self, B: int, T: int, nh: int, hs: int, stream):
        import cupy as cp

        cudnn = import_cudnn()
        self.B, self.T, self.nh, self.hs, C = B, T, nh, hs, nh * hs
        self.C = C
        self.handle = cudnn.create_handle()
        cudnn.set_stream(handle=self.handle, stream=stream.ptr)
        bf, f32 = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT
        dims = [B, nh, T, hs]
        in_rows, out_rows, lse_rows = [T * 3 * C, hs, 3 * C, 1], [T * C, hs, C, 1], [nh * T, T, 1, 1]
        scale = 1.0 / math.sqrt(hs)

        def graph():
            return cudnn.pygraph(io_data_type=bf, intermediate_data_type=f32, compute_data_type=f32,
                                 handle=self.handle)

        def operands(g, names, stride):
            return [g.tensor(name=n, dim=dims, stride=stride, data_type=bf) for n in names]

        # forward: y, lse = sdpa(q, k, v)
        fw = graph()
        q, k, v = operands(fw, "qkv", in_rows)
        try:
            o, lse = fw.sdpa(name="sdpa", q=q, k=k, v=v, is_inference=False, attn_scale=scale, use_causal_mask=True)
        except TypeError:  # newer frontends name it generate_stats
            o, lse = fw.sdpa(name="sdpa", q=q, k=k, v=v, generate_stats=True, attn_scale=scale, use_causal_mask=True)
        o.set_output(True).set_dim(dims).set_stride(out_rows).set_data_type(bf)
        lse.set_output(True).set_dim([B, nh, T, 1]).set_stride(lse_rows).set_data_type(f32)
        _build(fw, cudnn)
        self._fw = (fw, q, k, v, o, lse)

        # backward: dq, dk, dv from q, k, v, y, dy, lse
        bw = graph()
        q, k, v = operands(bw, "qkv", in_rows)
        o, do = operands(bw, ("o", "do"), out_rows)
        lse = bw.tensor(name="lse", dim=[B, nh, T, 1], stride=lse_rows, data_type=f32)
        grads = bw.sdpa_backward(name="sdpa_backward", q=q, k=k, v=v, o=o, dO=do, stats=lse, attn_scale=scale,
                                 use_causal_mask=True)
        for t in grads:
            t.set_output(True).set_dim(dims).set_stride(in_rows).set_data_type(bf)
        _build(bw, cudnn)
        self._bw = (bw, q, k, v, o, do, lse, *grads)
        self.workspace = cp.empty(max(fw.get_workspace_size(), bw.get_workspace_size(), 1), cp.uint8)

    def _check(self, name, x, cols, dtype) -> None:
        shape = (self.B, self.T, cols) if cols else (self.B, self.nh, self.T)
        if x.shape != shape or x.dtype.name != dtype or not x.flags.c_contiguous:
            raise ValueError(f"CausalAttention: {name} is {x.shape} {x.dtype}, expected C-contiguous {shape} {dtype}")

    def forward(self, y, lse, qkv) -> None:
        """y (B, T, C) bf16 and lse (B, nh, T) float32 from qkv (B, T, 3C) bf16."""
        self._check("qkv", qkv, 3 * self.C, "uint16")
        self._check("y", y, self.C, "uint16")
        self._check("lse", lse, 0, "float32")
        g, q, k, v, o, s = self._fw
        p, step = qkv.data.ptr, 2 * self.C
        g.execute({q: p, k: p + step, v: p + 2 * step, o: y.data.ptr, s: lse.data.ptr}, self.workspace.data.ptr,
                  handle=self.handle)

    def backward(self, dqkv, dy, qkv, y, lse) -> None:
        """dqkv (B, T, 3C) bf16 (written, not added to) from dy (B, T, C) and the forward's values."""
        for name, x, cols in (("dqkv", dqkv, 3 * self.C), ("qkv", qkv, 3 * self.C), ("dy", dy, self.C), ("y", y, self.C)):
            self._check(name, x, cols, "uint16")
        self._check("lse", lse, 0, "float32")
        g, q, k, v, o, do, s, dq, dk, dv = self._bw
        p, d, step = qkv.data.ptr, dqkv.data.ptr, 2 * self.C
        g.execute({q: p, k: p + step, v: p + 2 * step, o: y.data.ptr, do: dy.data.ptr, s: lse.data.ptr,
                   dq: d, dk: d + step, dv: d + 2 * step}, self.workspace.data.ptr, handle=self.handle)
