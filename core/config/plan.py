"""What a case will cost before it runs: parameters, tokens per step, memory, FLOPs per token."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from koifish_core.config.schema import Case


@dataclass
class Plan:
    parameters: int
    """Trainable parameters (unpadded, as Hugging Face counts them)."""
    tokens_per_step: int
    """B * T * grad_accum."""
    flops_per_token: float
    """Training FLOPs per token: 6 N + 12 L T C (nanoGPT's estimate, attention included)."""
    memory_weights: int
    memory_gradients: int
    memory_optimizer: int
    memory_activations: int
    memory_total: int
    """Bytes: weights in their stored precision, gradients, AdamW state (+ fp32 master weights
    when weights are stored in fewer than 32 bits), activations kept for the backward. With
    train.device cuda: the CUDA engine's own buffers (cuda_activation_bytes), which matched its
    measured peaks within a few percent (tests/test_config.py)."""

    def to_dict(self) -> dict:
        return asdict(self)


def activation_bytes(case: Case, bytes_per_value: int) -> int:
    """Activations kept for the backward of one micro-batch (llm.c's inventory)."""
    m, B, T = case.model, case.data.batch_size, case.data.seq_len
    C, L, nh = m.n_embd, m.n_layer, m.n_head
    F = m.ffn or 4 * C
    Vp = m.vocab_size if m.vocab_size <= 1024 else -(-m.vocab_size // 128) * 128
    if m.remat == 2:  # only each block's input survives; one block is rebuilt at a time
        per_layer_kept = B * T * C
        rebuilt = B * T * (8 * C + 3 * C + 2 * F) + B * nh * T * T
        return (L * per_layer_kept + rebuilt + B * T * (2 * C + Vp)) * bytes_per_value
    per_layer = B * T * (8 * C + 3 * C + 2 * F) + B * nh * T * T
    if m.remat == 1:  # LayerNorm outputs (2C) and GELU output (F) are recomputed
        per_layer -= B * T * (2 * C + F)
    return (L * per_layer + B * T * (2 * C + Vp)) * bytes_per_value


CUBLASLT_WORKSPACE, CUBLAS_WORKSPACE = 32 << 20, 64 << 20  # koifish_cuda.cublaslt's; cublas_raw's (cuBLAS attention)
# the CUDA engine's logits buffer: the LM head runs in chunks of rows this fits. GPT-2 124M on an H200 (stop 21,
# bench_train --head-mib): 1 GiB (two 8192-row chunks at B=16) ran 0.6% more tokens/s than 512 MiB (four),
# for 0.4 GiB more peak memory (7.8 against PyTorch's 8.4 GiB at B=16; 12.6 against 15.1 at B=32)
HEAD_BYTES = 1 << 30


def head_rows(N: int, Vp: int, itemsize: int) -> int:
    """Rows of logits the CUDA engine's LM head computes at a time: all N when they fit HEAD_BYTES,
    else the fewest equal chunks that do, rounded up to 128 rows (GEMM tiles). GPT-2's logits at
    B=16, T=1024 would take 1.5 GiB in bf16, more than a sixth of the whole step's memory."""
    chunks = -(-N * Vp * itemsize // HEAD_BYTES)
    if chunks <= 1:
        return N
    rows = -(-N // chunks)
    return min(N, -(-rows // 128) * 128)


def cuda_activation_bytes(case: Case) -> int:
    """The CUDA engine's activation and scratch buffers (core/engine/cuda_gpt2.py _alloc): GEMM operands
    in bf16 (precision.compute bf16) or float32, the residual stream in precision.residual, statistics in float32,
    cuDNN's attention under bf16 (a log-sum-exp per row and head), the cuBLAS one under fp32 (q, k, v
    and the T x T probabilities kept per layer, plus its scratch)."""
    m, B, T = case.model, case.data.batch_size, case.data.seq_len
    C, L, nh = m.n_embd, m.n_layer, m.n_head
    F = m.ffn or 4 * C
    Vp = -(-m.vocab_size // 128) * 128
    a = 2 if case.precision.compute == "bf16" else 4  # a GEMM operand
    res = 2 if case.precision.residual == "bf16" else 4  # the residual stream
    attn = {"lse": 4 * nh} if a == 2 else {"q": 4 * C, "k": 4 * C, "v": 4 * C, "att": 4 * nh * T}
    row = dict(ln1=a * C, m1=4, r1=4, qkv=a * 3 * C, atty=a * C, res2=res * C, ln2=a * C, m2=4, r2=4, fch=a * F,
               fch_gelu=a * F, res3=res * C, **attn)  # bytes per token of each buffer a layer keeps
    shared = set() if a == 2 else {"qkv"}  # buffers one copy of which serves every layer
    if m.remat == 1:
        shared |= {"ln1", "ln2", "fch_gelu"}
    elif m.remat == 2:
        shared = set(row) - {"res3"}
    kept = L * sum(v for k, v in row.items() if k not in shared) + sum(row[k] for k in shared)
    top = res * C + a * C + 8 + 4  # x0, lnf and its statistics, losses
    logits = a * Vp * head_rows(B * T, Vp, a)  # one chunk of rows at a time
    dres = 2 * C if case.precision.residual_grad == "bf16" else 4 * C + (a * C if a == 2 else 0)  # + its bf16 copy
    scratch = dres + a * C + a * 3 * C + a * C  # dres (and dres_g), dln, dqkv, datty
    if a == 4:
        scratch += 5 * 4 * C + 4 * nh * T  # the cuBLAS attention's head copies and score gradient
    return B * T * (kept + top + scratch) + logits


def make_plan(case: Case) -> Plan:
    from koifish_core.models.gpt2 import GPT2Config

    m = case.model
    cfg = GPT2Config.from_model_config(m)
    n = cfg.num_parameters()
    n_stored = sum(math.prod(s) for s in cfg.param_shapes().values())  # padded wte included
    wbits = case.precision.weights
    if case.train.device == "cuda":  # the engine: float32 master, gradients and moments; bf16 copy under bf16
        bf16 = case.precision.compute == "bf16"
        weights, grads, optimizer = n_stored * (2 if bf16 else 4), n_stored * 4, n_stored * 8 + (n_stored * 4 if bf16 else 0)
        acts = cuda_activation_bytes(case) + CUBLASLT_WORKSPACE + (0 if bf16 else CUBLAS_WORKSPACE)
    else:
        weights = n_stored * wbits // 8
        grads = n_stored * (2 if case.precision.compute == "bf16" else 4)
        optimizer = n_stored * 8 + (n_stored * 4 if wbits < 32 else 0)
        acts = activation_bytes(case, 2 if case.precision.compute == "bf16" else 4)
    tokens = case.data.batch_size * case.data.seq_len * case.optimizer.grad_accum
    flops = 6 * n + 12 * m.n_layer * case.data.seq_len * m.n_embd
    return Plan(parameters=n, tokens_per_step=tokens, flops_per_token=float(flops), memory_weights=weights,
                memory_gradients=grads, memory_optimizer=optimizer, memory_activations=acts,
                memory_total=weights + grads + optimizer + acts)
