"""Probe: cuDNN's fused causal attention (cudnn-frontend) on CuPy buffers, against the engine's
own attention (cuBLAS batched GEMMs around Numba softmax, float32) and PyTorch's SDPA.

q, k and v are read in place from the (B, T, 3C) qkv rows and the output is written straight into
(B, T, C) rows, so the head split/merge copies disappear. Checks the values against a float64
NumPy reference at a small shape, that the call replays inside a captured CUDA graph, and times
forward and backward at GPT-2 shapes.

    python bench/probe_cudnn_attention.py --batch 16 --out bench/results/probe_cudnn_attention.json
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    import cupy as cp

    from bench.bench_common import median_time, write_json
    from koifish_cuda.attention import attention_backward_ref, attention_forward_ref
    from koifish_cuda.bf16 import from_bf16_ref, to_bf16_ref
    from koifish_cuda.cudnn_attention import CausalAttention

    stream = cp.cuda.Stream(non_blocking=True)
    report = {}

    # ---- values: a small shape against float64 NumPy ------------------------------------------
    B, T, nh, hs = 2, 128, 3, 64
    C = nh * hs
    rng = np.random.default_rng(0)
    qkv = to_bf16_ref(rng.standard_normal((B, T, 3 * C)).astype(np.float32))
    dy = to_bf16_ref(rng.standard_normal((B, T, C)).astype(np.float32))
    att = CausalAttention(B, T, nh, hs, stream)
    with stream:
        d_qkv, d_dy = cp.asarray(qkv), cp.asarray(dy)
        d_y, d_dqkv = cp.zeros((B, T, C), cp.uint16), cp.zeros((B, T, 3 * C), cp.uint16)
        d_lse = cp.zeros((B, nh, T), cp.float32)
        att.forward(d_y, d_lse, d_qkv)
        att.backward(d_dqkv, d_dy, d_qkv, d_y, d_lse)
        stream.synchronize()
    y, dqkv = from_bf16_ref(d_y.get()), from_bf16_ref(d_dqkv.get())
    q64, dy64 = from_bf16_ref(qkv).astype(np.float64), from_bf16_ref(dy).astype(np.float64)
    ry, p = attention_forward_ref(q64, nh)
    rdqkv = attention_backward_ref(dy64, q64, p, nh)
    report["max_err_y"] = float(np.abs(y - ry).max() / np.abs(ry).max())
    report["max_err_dqkv"] = float(np.abs(dqkv - rdqkv).max() / np.abs(rdqkv).max())
    # replay inside a captured graph gives the same values
    with stream:
        d_y2, d_dqkv2 = cp.zeros_like(d_y), cp.zeros_like(d_dqkv)
        stream.begin_capture()
        att.forward(d_y2, d_lse, d_qkv)
        att.backward(d_dqkv2, d_dy, d_qkv, d_y2, d_lse)
        g = stream.end_capture()
        g.launch(stream)
        stream.synchronize()
    report["graph_replay_equal"] = bool((d_y2 == d_y).all() and (d_dqkv2 == d_dqkv).all())
    print(report, flush=True)

    # ---- speed at GPT-2 shapes -----------------------------------------------------------------
    B, T, nh, hs = args.batch, args.seq, args.heads, args.head_dim
    C = nh * hs
    flops_fwd = 4 * B * nh * T * T * hs / 2  # causal: half the score matrix
    att = CausalAttention(B, T, nh, hs, stream)
    with stream:
        qkv = (cp.random.standard_normal((B, T, 3 * C), dtype=cp.float32)).view(cp.uint32)
        qkv = ((qkv + 0x7FFF + ((qkv >> 16) & 1)) >> 16).astype(cp.uint16)
        y, dy, dqkv = cp.zeros((B, T, C), cp.uint16), qkv[:, :, :C].copy(), cp.zeros_like(qkv)
        lse = cp.zeros((B, nh, T), cp.float32)
    t_f = median_time(lambda ns: att.forward(y, lse, qkv), 10, 5, stream)
    t_b = median_time(lambda ns: att.backward(dqkv, dy, qkv, y, lse), 10, 5, stream)
    report["cudnn"] = dict(fwd_ms=t_f * 1e3, bwd_ms=t_b * 1e3, fwd_tflops=flops_fwd / t_f / 1e12,
                           bwd_tflops=2.5 * flops_fwd / t_b / 1e12)
    print("cudnn", report["cudnn"], flush=True)
    report["engine_fp32"] = engine_attention_time(stream, B, T, nh, hs)
    print("engine fp32", report["engine_fp32"], flush=True)
    try:
        report["torch_sdpa"] = torch_time(B, T, nh, hs)
        print("torch", report["torch_sdpa"], flush=True)
    except ImportError:
        pass
    if args.out:
        write_json(args.out, report)


def engine_attention_time(stream, B, T, nh, hs) -> dict:
    """The engine's own attention, forward and backward (core/engine/cuda_attention.CublasAttention:
    head copies, batched GEMMs, the Numba softmax), in float32."""
    import cupy as cp
    from numba import cuda

    from bench.bench_common import median_time
    from koifish_core.engine.cuda_attention import CublasAttention

    C = nh * hs
    ns = cuda.external_stream(stream.ptr)
    f = lambda *s: cp.zeros(s, cp.float32)  # noqa: E731
    with stream:
        att = CublasAttention(B, T, nh, hs, stream, ns, f)
        a = {k: f(*s) for k, s in att.sizes.items()}
        a.update(qkv=f(B * T, 3 * C), atty=f(B * T, C))
        datty, dqkv = f(B * T, C), f(B * T, 3 * C)
    return dict(fwd_ms=median_time(lambda _: att.forward(a), 10, 5, stream) * 1e3,
                bwd_ms=median_time(lambda _: att.backward(a, datty, dqkv), 10, 5, stream) * 1e3)


def torch_time(B, T, nh, hs) -> dict:
    import torch
    import torch.nn.functional as F

    q, k, v = (torch.randn(B, nh, T, hs, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dy = torch.randn(B, nh, T, hs, device="cuda", dtype=torch.bfloat16)

    def run(back):
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if back:
            y.backward(dy)

    def t(back):
        for _ in range(3):
            run(back)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(20):
            run(back)
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / 20

    f = t(False)
    return dict(fwd_ms=f, bwd_ms=t(True) - f)


if __name__ == "__main__":
    main()
