"""Quality of quantization, measured: perplexity with the linear weights fake-quantized at each bit width.

Fake quantization rounds each weight through its group-wise integer code and back (the exact
values a quantized kernel computes with), so the float CPU path measures what N bits cost.
Embeddings, positions and norms stay float, as `koifish quantize` leaves them by default.
Works on any model open_model opens: a koifish GPT-2 run or checkpoint, a GPT-2 or Qwen3 folder.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from koifish_core.errors import KoifishError
from koifish_core.infer.quant import fake_quantize

GPT2_LINEARS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class BitsResult:
    bits: int
    """Weight width; 32 is the float model itself."""
    loss: float
    tokens: int
    act_bits: int = 16
    """8: every linear's input rounded to int8 per 16 values first, as the GPU's 4-bit decode GEMVs do."""

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))


def linear_weights(model) -> dict[str, np.ndarray]:
    """The model's linear weight matrices by name, as writable arrays (views into the model)."""
    if hasattr(model, "param_views"):  # GPT-2
        return {n: v for n, v in model.param_views().items() if n.endswith(GPT2_LINEARS)}
    from koifish_core.models.qwen3 import LINEARS

    return {n: w for n, w in model.weights.items() if n.endswith(LINEARS) and isinstance(w, np.ndarray)}


def mean_loss(model, windows, batch_size: int) -> tuple[float, int]:
    """Mean next-token loss over (x, y) windows, batched."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        xs, ys = zip(*windows[start:start + batch_size])
        y = np.stack(ys)
        _, loss = model.forward(np.stack(xs), y)
        total += float(loss) * y.size
        count += y.size
    return total / count, count


@contextmanager
def int8_inputs():
    """Every linear of the CPU models (GPT-2's matmul_forward_ref, Qwen3's linear) takes its input rounded
    to int8 per 16 values of a row (koifish_cuda.quant_a8.round_x16_ref) while inside."""
    import koifish_core.models.gpt2 as gpt2
    import koifish_core.models.qwen3 as qwen3
    from koifish_cuda.quant_a8 import round_x16_ref

    saved = gpt2.matmul_forward_ref, qwen3.linear
    gpt2.matmul_forward_ref = lambda x, w, b=None: saved[0](round_x16_ref(x), w, b)
    qwen3.linear = lambda x, w, b=None: saved[1](round_x16_ref(x), w, b)
    try:
        yield
    finally:
        gpt2.matmul_forward_ref, qwen3.linear = saved


def perplexity_by_bits(model_path: str | Path, data: str, bits_list=(8, 4, 3), seq_len: int | None = None,
                       batch_size: int = 8, max_windows: int | None = 64, group_size: int = 128,
                       on_result=None, int8_activations: bool = False) -> list[BitsResult]:
    """[float result, then one per width], all on the same windows of `data` (shards or builtin:kjv:val);
    int8_activations: after the 4-bit row, one with int8 inputs too (act_bits 8: the GPU decode's GEMVs)."""
    from koifish_core.data.loader import iter_windows, resolve_paths
    from koifish_core.models.from_path import open_model

    opened = open_model(model_path)
    T = seq_len or opened.n_ctx
    if not 0 < T <= opened.n_ctx:
        raise KoifishError(f"--seq-len: expected 1..{opened.n_ctx} (the model's context), got {T}")
    windows = []
    for window in iter_windows(resolve_paths(data), T):
        windows.append(window)
        if max_windows is not None and len(windows) >= max_windows:
            break
    if not windows:
        raise KoifishError(f"{data}: fewer than {T + 1} tokens, not one window of {T} to evaluate")
    weights = linear_weights(opened.model)
    if not weights:
        raise KoifishError(f"{model_path}: no float linear weights to quantize (already quantized?)")
    originals = {n: w.copy() for n, w in weights.items()}
    results = [BitsResult(32, *mean_loss(opened.model, windows, batch_size))]
    if on_result:
        on_result(results[-1])
    try:
        for bits in bits_list:
            for name, w in weights.items():
                w[...] = fake_quantize(originals[name], bits, group_size)
            results.append(BitsResult(bits, *mean_loss(opened.model, windows, batch_size)))
            if on_result:
                on_result(results[-1])
            if bits == 4 and int8_activations:
                with int8_inputs():
                    results.append(BitsResult(bits, *mean_loss(opened.model, windows, batch_size), act_bits=8))
                if on_result:
                    on_result(results[-1])
    finally:
        for name, w in weights.items():
            w[...] = originals[name]
    return results
