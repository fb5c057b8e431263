"""The CUDA engine's causal attention, two ways behind one interface.

Both read a layer's qkv rows (N, 3C) and write its atty rows (N, C); the backward reads d(atty)
and writes dqkv rows. The rows are float32 or bf16 bits, as the engine's precision.compute says.

- CudnnAttention: cuDNN's fused flash attention (koifish_cuda.cudnn_attention); bf16 only. Keeps
  one (B, nh, T) log-sum-exp per layer; the qkv rows themselves must survive to the backward.
- CublasAttention: the heads copied out to (B*nh, T, hs) float32, batched cuBLAS GEMMs around the
  Numba causal softmax; keeps q, k, v and the (B*nh, T, T) probabilities per layer. Any precision,
  no extra package; ~12x slower than cuDNN at GPT-2 124M shapes (bench/probe_cudnn_attention.py).
"""

from __future__ import annotations

import math

from koifish_core.errors import KoifishError


class CublasAttention:
    name = "cublas"
    keeps_qkv = False  # the backward reads the head-split copies, so one qkv buffer serves all layers

    def __init__(self, B, T, nh, hs, stream, ns, alloc):
        """A cuBLAS handle of its own (on `stream`; the engine's other GEMMs are cuBLASLt's), alloc(*shape)
        the float32 scratch."""
        from koifish_cuda.cublas_raw import Cublas

        self.C, self.ns, self.scale = nh * hs, ns, 1.0 / math.sqrt(hs)
        self.blas = Cublas(stream, tf32=True)
        BH = B * nh
        self.sizes = dict(q=(BH, T, hs), k=(BH, T, hs), v=(BH, T, hs), att=(BH, T, T))
        self.yh, self.dyh, self.dqh, self.dkh, self.dvh = (alloc(BH, T, hs) for _ in range(5))
        self.datt = alloc(BH, T, T)

    def forward(self, a) -> None:
        from koifish_cuda.attention import merge_heads, softmax_causal_forward, split_heads

        for i, dst in enumerate((a["q"], a["k"], a["v"])):
            split_heads(dst, a["qkv"], i * self.C, self.ns)
        self.blas.batched_gemm(a["att"], a["q"], a["k"], trans_b=True)  # (BH, T, T) scores
        softmax_causal_forward(a["att"], self.scale, self.ns)
        self.blas.batched_gemm(self.yh, a["att"], a["v"])  # (BH, T, hs)
        merge_heads(a["atty"], self.yh, 0, self.ns)

    def backward(self, a, datty, dqkv) -> None:
        from koifish_cuda.attention import merge_heads, softmax_causal_backward, split_heads

        gemm, s = self.blas.batched_gemm, self.ns
        split_heads(self.dyh, datty, 0, s)
        gemm(self.datt, self.dyh, a["v"], trans_b=True)
        gemm(self.dvh, a["att"], self.dyh, trans_a=True)
        softmax_causal_backward(self.datt, a["att"], self.scale, s)
        gemm(self.dqh, self.datt, a["k"])
        gemm(self.dkh, self.datt, a["q"], trans_a=True)
        for i, src in enumerate((self.dqh, self.dkh, self.dvh)):
            merge_heads(dqkv, src, i * self.C, s)


class CudnnAttention:
    name = "cudnn"
    keeps_qkv = True

    def __init__(self, B, T, nh, hs, stream):
        from koifish_cuda.cudnn_attention import CausalAttention

        self.B, self.T, self.nh = B, T, nh
        self.sizes = dict(lse=(B, nh, T))
        self.op = CausalAttention(B, T, nh, hs, stream)

    def _rows(self, x):
        return x.reshape(self.B, self.T, -1)

    def forward(self, a) -> None:
        self.op.forward(self._rows(a["atty"]), a["lse"], self._rows(a["qkv"]))

    def backward(self, a, datty, dqkv) -> None:
        self.op.backward(self._rows(dqkv), self._rows(datty), self._rows(a["qkv"]), self._rows(a["atty"]), a["lse"])


def make_attention(choice: str, bf16: bool, B, T, nh, hs, stream, ns, alloc):
    """choice 'auto': cuDNN's when the activations are bf16 and cudnn-frontend loads, else the cuBLAS
    one; 'cudnn' or 'cublas' insist. Returns (attention, why the cuBLAS one was taken or '')."""
    if choice not in ("auto", "cudnn", "cublas"):
        raise KoifishError(f"attention {choice!r}: expected auto, cudnn or cublas")
    if choice == "cudnn" and not bf16:
        raise KoifishError("cuDNN attention runs in bf16: set precision.compute to bf16")
    if choice == "cublas" or not bf16:
        return CublasAttention(B, T, nh, hs, stream, ns, alloc), ("chosen" if choice == "cublas" else
                                                                  "precision.compute fp32 (cuDNN attention is bf16)")
    if choice == "cudnn":
        return CudnnAttention(B, T, nh, hs, stream), ""
    try:
        return CudnnAttention(B, T, nh, hs, stream), ""
    except KoifishError as e:  # cudnn-frontend or cuDNN missing
        why = str(e)
    except Exception as e:  # noqa: BLE001 -- cuDNN has no plan for this shape: the other path has
        why = f"cuDNN attention unsupported for B={B} T={T} heads={nh} head_dim={hs}: {e}"
    return CublasAttention(B, T, nh, hs, stream, ns, alloc), why
