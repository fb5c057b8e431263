"""Quantized weights on the CPU path, and the checkpoint formats they come from.

Every format ends up as one QuantizedWeight: codes (N, K) per output row and input column, integer
zero points and fp16 scales per group (see koifish_cuda.quant for the arithmetic). Formats:

koifish (`koifish quantize`), per linear `NAME`:
    NAME.qweight (N, K*b/8) uint8 bit stream   NAME.scales (N, K/G) f16   NAME.qzeros (N, K/G) uint8
AWQ GEMM (AutoAWQ, e.g. Qwen/Qwen3-32B-AWQ), 4 bits, input-major:
    qweight (K, N/8) int32: nibble i (bits 4i..4i+3) of column c holds output c*8 + AWQ_ORDER[i]
    qzeros  (K/G, N/8) int32, packed the same way      scales (K/G, N) f16
GPTQ (AutoGPTQ / GPTQModel), 4 or 8 bits:
    qweight (K*b/32, N) int32: field j of row r holds input r*(32/b) + j
    qzeros  (ng, N*b/32) int32: field j of column c holds output c*(32/b) + j (no reordering)
    scales  (ng, N) f16     g_idx (K,) int32: the group of each input (act-order permutes them)
    checkpoint_format "gptq" (v1) stores zero - 1 (mod 2^b); "gptq_v2" stores zero itself.
Both dequantize as W[k, n] = (q[k, n] - zero[g(k), n]) * scale[g(k), n]; nn.Linear's weight is W.T.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from koifish_cuda.quant import (
    SUPPORTED_BITS,
    dequantize_groupwise_ref,
    pack_codes_ref,
    quantize_groupwise_ref,
    unpack_codes_ref,
)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ's pack order: nibble i <- column AWQ_ORDER[i] of 8
AWQ_REVERSE_ORDER = tuple(int(i) for i in np.argsort(AWQ_ORDER))  # column c <- nibble AWQ_REVERSE_ORDER[c]


@dataclass
class QuantizedWeight:
    """A (N, K) weight held as packed integer codes; dequantized on use."""

    packed: np.ndarray
    """(N, K*bits/8) uint8: each row's codes as a little-endian bit stream."""
    scales: np.ndarray
    """(N, n_groups) float16."""
    zeros: np.ndarray
    """(N, n_groups) uint8 integer zero points."""
    bits: int
    group_size: int
    g_idx: np.ndarray | None = None
    """(K,) group of each input column; None when column k is in group k // group_size."""
    keep_dense: bool = False
    """Keep the dequantized matrix after first use: the CPU path's speed for 8x the memory."""
    _dense: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.scales.shape[1] * self.group_size

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + self.zeros.nbytes

    def codes(self) -> np.ndarray:
        return unpack_codes_ref(self.packed, self.bits, self.shape[1])

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        return dequantize_groupwise_ref(self.codes(), self.scales, self.zeros, self.group_size, self.g_idx, dtype)

    def sorted_by_group(self) -> tuple["QuantizedWeight", np.ndarray | None] | None:
        """(w, perm): this matrix with its input columns reordered so that each group is contiguous,
        W' = W[:, perm] (so W' x[perm] = W x), g_idx None; perm None when that is already so. None
        when the groups are not all group_size columns (then no reordering makes them contiguous)."""
        if self.g_idx is None:
            return self, None
        K = self.shape[1]
        perm = np.argsort(self.g_idx, kind="stable")
        if not np.array_equal(self.g_idx[perm], np.arange(K) // self.group_size):
            return None
        packed = pack_codes_ref(self.codes()[:, perm], self.bits)
        return QuantizedWeight(packed, self.scales, self.zeros, self.bits, self.group_size), perm

    def rows(self, ids: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Dequantized rows ids (...,) -> (..., K): an embedding lookup without the whole table."""
        flat = np.asarray(ids).reshape(-1)
        part = QuantizedWeight(self.packed[flat], self.scales[flat], self.zeros[flat], self.bits,
                               self.group_size, self.g_idx)
        return part.dequantize(dtype).reshape(*np.shape(ids), -1)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """x (..., K) @ W.T -> (..., N), dequantizing into a scratch matrix as Koifish does."""
        if not self.keep_dense:
            return x @ self.dequantize(x.dtype).T
        if self._dense is None or self._dense.dtype != x.dtype:
            self._dense = self.dequantize(x.dtype)
        return x @ self._dense.T


def quantize_weight(w: np.ndarray, bits: int, group_size: int = 128) -> QuantizedWeight:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    G = effective_group_size(w.shape[1], group_size)
    codes, scales, zeros = quantize_groupwise_ref(w, bits, G)
    return QuantizedWeight(pack_codes_ref(codes, bits), scales, zeros, bits, G)


def effective_group_size(K: int, group_size: int) -> int:
    """group_size, or K itself for matrices narrower than one group (tiny test models)."""
    G = min(group_size, K)
    if K % G:
        raise ValueError(f"input width {K} is not a multiple of the group size {G}")
    return G


def fake_quantize(w: np.ndarray, bits: int, group_size: int = 128) -> np.ndarray:
    """W rounded through `bits`-bit codes and back, same shape and dtype: measures quantization error."""
    return quantize_weight(w, bits, group_size).dequantize(w.dtype)


# ---- bit fields inside int32 words (AWQ and GPTQ) ----

def _fields(words: np.ndarray, bits: int) -> np.ndarray:
    """int32 (..., W) -> (..., W, 32/bits) fields, field i = bits [i*b, i*b + b)."""
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    return ((words.view(np.uint32)[..., None] >> shifts) & ((1 << bits) - 1)).astype(np.uint8)


def _words(fields: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of _fields: (..., W, 32/bits) -> int32 (..., W)."""
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    # C order matters: safetensors writes an array's memory as it lies
    return np.ascontiguousarray(np.bitwise_or.reduce(fields.astype(np.uint32) << shifts, axis=-1)).view(np.int32)


def _awq_unpack_cols(packed: np.ndarray) -> np.ndarray:
    f = _fields(packed, 4)  # (R, N/8, 8) nibbles in pack order
    return f[..., list(AWQ_REVERSE_ORDER)].reshape(packed.shape[0], -1)  # (R, N)


def _awq_pack_cols(values: np.ndarray) -> np.ndarray:
    R, N = values.shape
    return _words(values.reshape(R, N // 8, 8)[..., list(AWQ_ORDER)], 4)


def awq_unpack(qweight, qzeros, scales, group_size: int) -> QuantizedWeight:
    """AWQ GEMM tensors -> QuantizedWeight of the nn.Linear weight (N, K)."""
    codes = _awq_unpack_cols(qweight).T  # (N, K)
    zeros = _awq_unpack_cols(qzeros).T  # (N, ng)
    return QuantizedWeight(pack_codes_ref(np.ascontiguousarray(codes), 4), np.ascontiguousarray(scales.T),
                           np.ascontiguousarray(zeros), 4, group_size)


def awq_pack(codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray):
    """Spec-written packer (tests): codes (N, K), zeros/scales (N, ng) -> (qweight, qzeros, scales)."""
    return (_awq_pack_cols(codes.T.astype(np.uint8)), _awq_pack_cols(zeros.T.astype(np.uint8)),
            np.ascontiguousarray(scales.T.astype(np.float16)))


def gptq_unpack(qweight, qzeros, scales, g_idx, bits: int, group_size: int, zero_offset: int = 1) -> QuantizedWeight:
    """GPTQ tensors -> QuantizedWeight (N, K); zero_offset 1 for checkpoint_format gptq (v1), 0 for v2."""
    if bits not in (4, 8):
        raise ValueError(f"GPTQ with {bits} bits is not supported (4 or 8)")
    mask = (1 << bits) - 1
    codes = _fields(qweight.T, bits).reshape(qweight.shape[1], -1)  # (N, K): inputs run along a row's words
    zeros = _fields(qzeros, bits).reshape(qzeros.shape[0], -1)  # (ng, N)
    zeros = ((zeros.astype(np.int32) + zero_offset) & mask).astype(np.uint8)
    K = codes.shape[1]
    g_idx = None if g_idx is None else np.asarray(g_idx, dtype=np.int64)
    if g_idx is not None and np.array_equal(g_idx, np.arange(K) // group_size):
        g_idx = None  # the plain layout: contiguous groups dequantize faster
    return QuantizedWeight(pack_codes_ref(np.ascontiguousarray(codes), bits), np.ascontiguousarray(scales.T),
                           np.ascontiguousarray(zeros.T), bits, group_size, g_idx)


def gptq_pack(codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray, bits: int,
              zero_offset: int = 1):
    """Spec-written packer (tests): codes (N, K), zeros/scales (N, ng) -> (qweight, qzeros, scales, g_idx)."""
    per = 32 // bits
    N, K = codes.shape
    qweight = _words(codes.T.reshape(K // per, per, N).transpose(0, 2, 1), bits)  # (K/per, N)
    stored = ((zeros.T.astype(np.int32) - zero_offset) & ((1 << bits) - 1)).astype(np.uint8)  # (ng, N)
    qzeros = _words(stored.reshape(stored.shape[0], N // per, per), bits)
    return qweight, qzeros, np.ascontiguousarray(scales.T.astype(np.float16)), np.asarray(g_idx, dtype=np.int32)
