"""Group-wise integer weights (8, 4 and 3 bits): quantize, pack, dequantize.

A linear weight W (N, K) (out, in, as nn.Linear) is cut along K into groups of G columns.
Per (row, group), with the range widened to hold 0 (as GPTQ does, so zero is an exact code):
    scale = (max - min) / (2^b - 1)       rounded to fp16 first: the stored scale is the one used
    zero  = round(-min / scale)           an integer code in [0, 2^b - 1]
    q     = clip(round(W / scale) + zero, 0, 2^b - 1)
    W ~= (q - zero) * scale

    codes  (N, K)     uint8, one code per weight (unpacked)
    packed (N, K*b/8) uint8, codes as a little-endian bit stream per row (b = 3 packs 8 codes in 3 bytes)
    scales (N, K/G)   float16
    zeros  (N, K/G)   uint8
    g_idx  (K,)       group of each input column; None means column k is in group k // G.
GPTQ's act-order checkpoints permute the groups, hence g_idx.
"""

from __future__ import annotations

import numpy as np

SUPPORTED_BITS = (8, 4, 3)


def quantize_groupwise_ref(w: np.ndarray, bits: int, group_size: int):
    """(codes, scales, zeros) of W (N, K); K must be a multiple of group_size."""
    N, K = w.shape
    levels = (1 << bits) - 1
    g = w.astype(np.float32).reshape(N, K // group_size, group_size)  # (N, ng, G)
    lo = np.minimum(g.min(axis=-1), 0.0)
    hi = np.maximum(g.max(axis=-1), 0.0)
    scale = ((hi - lo) / levels).astype(np.float16)
    # an all-zero group, or one whose range underflows fp16: any positive scale represents it
    scale = np.where(scale > 0, scale, np.float16(2.0**-24))
    s32 = scale.astype(np.float32)
    zero = np.clip(np.rint(-lo / s32), 0, levels)
    codes = np.clip(np.rint(g / s32[..., None]) + zero[..., None], 0, levels)
    return codes.reshape(N, K).astype(np.uint8), scale, zero.astype(np.uint8)


def dequantize_groupwise_ref(codes, scales, zeros, group_size: int, g_idx=None, dtype=np.float32) -> np.ndarray:
    """W (N, K) from codes (N, K), scales and zeros (N, ng)."""
    N, K = codes.shape
    if g_idx is None:
        q = codes.reshape(N, K // group_size, group_size).astype(np.float32)
        w = (q - zeros[..., None].astype(np.float32)) * scales[..., None].astype(np.float32)
        return w.reshape(N, K).astype(dtype, copy=False)
    s = scales.astype(np.float32)[:, g_idx]  # (N, K)
    z = zeros.astype(np.float32)[:, g_idx]
    return ((codes.astype(np.float32) - z) * s).astype(dtype, copy=False)


def pack_codes_ref(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (N, K) -> (N, K*bits/8) uint8: code k occupies bits [k*b, k*b + b) of the row."""
    N, K = codes.shape
    if (K * bits) % 8:
        raise ValueError(f"{K} codes of {bits} bits do not fill whole bytes")
    bitplanes = np.unpackbits(codes.astype(np.uint8)[..., None], axis=-1, bitorder="little")[..., :bits]
    return np.packbits(bitplanes.reshape(N, K * bits), axis=-1, bitorder="little")


def unpack_codes_ref(packed: np.ndarray, bits: int, K: int) -> np.ndarray:
    N = packed.shape[0]
    bitplanes = np.unpackbits(packed, axis=-1, count=K * bits, bitorder="little").reshape(N, K, bits)
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    return (bitplanes * weights).sum(axis=-1, dtype=np.uint8)


def dequant_matmul_ref(x: np.ndarray, codes, scales, zeros, group_size: int, g_idx=None) -> np.ndarray:
    """x (M, K) @ dequant(W).T -> (M, N): what the fused dequantize + GEMV/GEMM kernels compute."""
    return x @ dequantize_groupwise_ref(codes, scales, zeros, group_size, g_idx, dtype=x.dtype).T
