"""Qwen3 (dense) in NumPy: the CPU inference path and the reference for the GPU one.

Pre-RMSNorm blocks; attention with RMSNorm on each head's q and k, rotary positions (RoPE,
rotate-half layout, theta from the config), grouped-query attention (n_kv_head <= n_head);
SwiGLU MLP; embeddings tied to the head or not. Weights are keyed by Hugging Face's names
without the `model.` prefix; a linear weight is a float array (N, K) or a QuantizedWeight.

    embed_tokens (V, C)                 layers.{l}.input_layernorm (C)
    layers.{l}.self_attn.q_proj (nh*hd, C)   k_proj, v_proj (nkv*hd, C)   o_proj (C, nh*hd)
    layers.{l}.self_attn.q_norm (hd)    k_norm (hd)       post_attention_layernorm (C)
    layers.{l}.mlp.gate_proj, up_proj (F, C)   down_proj (C, F)
    norm (C)                            lm_head (V, C), the same object as embed_tokens when tied
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from koifish_core.infer.quant import QuantizedWeight

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")


@dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int = 151936
    """Rows of the embedding and the head (the tokenizer's ids fit below it)."""
    hidden_size: int = 5120
    """C, the residual stream width."""
    intermediate_size: int = 25600
    """F, the SwiGLU hidden width."""
    n_layer: int = 64
    n_head: int = 64
    """Query heads."""
    n_kv_head: int = 8
    """Key/value heads; each serves n_head / n_kv_head query heads (grouped-query attention)."""
    head_dim: int = 128
    """hd; Qwen3 sets it apart from hidden_size / n_head."""
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """Biases on q/k/v/o projections (false in every released Qwen3)."""
    n_ctx: int = 40960
    """max_position_embeddings: the longest context the model was trained for."""

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight's shape, by koifish name (biases only when attention_bias)."""
        C, F, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.n_head * hd, self.n_kv_head * hd
        out = {"embed_tokens": (self.vocab_size, C)}
        for l in range(self.n_layer):
            p = f"layers.{l}."
            out.update({p + "input_layernorm": (C,), p + "post_attention_layernorm": (C,),
                        p + "self_attn.q_proj": (q, C), p + "self_attn.k_proj": (kv, C),
                        p + "self_attn.v_proj": (kv, C), p + "self_attn.o_proj": (C, q),
                        p + "self_attn.q_norm": (hd,), p + "self_attn.k_norm": (hd,),
                        p + "mlp.gate_proj": (F, C), p + "mlp.up_proj": (F, C), p + "mlp.down_proj": (C, F)})
            if self.attention_bias:
                out.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                            p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.bias": (C,)})
        out["norm"] = (C,)
        if not self.tie_word_embeddings:
            out["lm_head"] = (self.vocab_size, C)
        return out


# ---- the layer references ----

def rmsnorm_ref(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x * w / sqrt(mean(x^2) + eps) over the last axis, accumulated in float32 as HF does."""
    x32 = x.astype(np.float32, copy=False)
    rstd = 1.0 / np.sqrt((x32 * x32).mean(axis=-1, keepdims=True) + np.float32(eps))
    return (w * (x32 * rstd)).astype(x.dtype, copy=False)


def rope_tables(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (T, hd), for absolute positions (T,)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (hd/2,)
    angles = positions.astype(np.float64)[:, None] * inv_freq  # (T, hd/2)
    angles = np.concatenate([angles, angles], axis=-1)  # (T, hd): rotate-half pairs i with i + hd/2
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope_ref(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x (..., T, hd) rotated: x * cos + rotate_half(x) * sin, rotate_half(a, b) = (-b, a)."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def swiglu_ref(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return silu(gate) * up


def gqa_attention_ref(q: np.ndarray, k: np.ndarray, v: np.ndarray, past: int) -> np.ndarray:
    """Causal attention with grouped KV heads.

    q (B, nh, T, hd) for positions past..past+T-1; k, v (B, nkv, S, hd) with S = past + T.
    Returns (B, nh, T, hd). Query t sees keys 0..past+t.
    """
    B, nh, T, hd = q.shape
    nkv, S = k.shape[1], k.shape[2]
    qg = q.reshape(B, nkv, nh // nkv, T, hd)  # (B, nkv, g, T, hd): the g query heads sharing one kv head
    scores = np.matmul(qg, k[:, :, None].swapaxes(-1, -2)) * np.float32(hd**-0.5)  # (B, nkv, g, T, S)
    future = np.arange(S)[None, :] > (past + np.arange(T))[:, None]  # (T, S)
    scores = np.where(future, -np.inf, scores).astype(np.float32)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return np.matmul(p.astype(v.dtype), v[:, :, None]).reshape(B, nh, T, hd)


def linear(x: np.ndarray, w, b: np.ndarray | None = None) -> np.ndarray:
    out = w.apply(x) if isinstance(w, QuantizedWeight) else x @ w.T
    return out if b is None else out + b


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean -log p(target) over all positions, row by row so the (N, V) temporaries stay small."""
    flat = logits.reshape(-1, logits.shape[-1])
    t = np.asarray(targets).reshape(-1)
    total = 0.0
    for start in range(0, flat.shape[0], 256):
        rows = flat[start:start + 256].astype(np.float64)
        m = rows.max(axis=-1)
        lse = m + np.log(np.exp(rows - m[:, None]).sum(axis=-1))
        total += float((lse - rows[np.arange(rows.shape[0]), t[start:start + 256]]).sum())
    return total / t.size


class KVCache:
    """Keys and values of the positions seen so far, preallocated for max_len positions.

    k[l], v[l]: (B, nkv, max_len, hd); positions [0, length) are filled.
    """

    def __init__(self, config: Qwen3Config, batch: int, max_len: int, dtype=np.float32):
        shape = (batch, config.n_kv_head, max_len, config.head_dim)
        self.k = [np.zeros(shape, dtype) for _ in range(config.n_layer)]
        self.v = [np.zeros(shape, dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.length = 0

    def truncate(self, length: int) -> None:
        """Forget positions >= length (a chat turn that rewrote the end of the conversation)."""
        self.length = min(self.length, length)


class Qwen3:
    def __init__(self, config: Qwen3Config, weights: dict, dtype=np.float32):
        self.config = config
        self.dtype = dtype
        self.weights = weights
        if config.tie_word_embeddings:
            weights["lm_head"] = weights["embed_tokens"]

    def w(self, name: str):
        return self.weights[name]

    def num_parameters(self) -> int:
        return sum(int(np.prod(s)) for s in self.config.shapes().values())

    def keep_dequantized(self, budget_bytes: int) -> bool:
        """Let quantized matrices keep their float copies after first use, if all of them fit the budget.

        Same numbers, much faster CPU decode; on a GPU the fused kernels make this unnecessary."""
        quantized = {id(w): w for w in self.weights.values() if isinstance(w, QuantizedWeight)}.values()
        dense = sum(int(np.prod(w.shape)) * np.dtype(self.dtype).itemsize for w in quantized)
        if not quantized or dense > budget_bytes:
            return False
        for w in quantized:
            w.keep_dense = True
        return True

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, batch, max_len or self.config.n_ctx, self.dtype)

    def embed(self, idx: np.ndarray) -> np.ndarray:
        table = self.weights["embed_tokens"]
        return table.rows(idx, self.dtype) if isinstance(table, QuantizedWeight) else table[idx].astype(self.dtype)

    def _attention(self, l: int, x: np.ndarray, cos, sin, cache: KVCache | None, past: int) -> np.ndarray:
        cfg, p = self.config, f"layers.{l}.self_attn."
        B, T, _ = x.shape
        hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
        bias = (lambda n: self.weights[p + n + ".bias"]) if cfg.attention_bias else (lambda n: None)
        q = linear(x, self.w(p + "q_proj"), bias("q_proj")).reshape(B, T, nh, hd)
        k = linear(x, self.w(p + "k_proj"), bias("k_proj")).reshape(B, T, nkv, hd)
        v = linear(x, self.w(p + "v_proj"), bias("v_proj")).reshape(B, T, nkv, hd)
        # Qwen3 normalizes each head's q and k before the rotation
        q = rope_ref(rmsnorm_ref(q, self.w(p + "q_norm"), cfg.rms_norm_eps).transpose(0, 2, 1, 3), cos, sin)
        k = rope_ref(rmsnorm_ref(k, self.w(p + "k_norm"), cfg.rms_norm_eps).transpose(0, 2, 1, 3), cos, sin)
        v = v.transpose(0, 2, 1, 3)  # (B, nkv, T, hd)
        if cache is not None:
            cache.k[l][:, :, past:past + T] = k
            cache.v[l][:, :, past:past + T] = v
            k, v = cache.k[l][:, :, :past + T], cache.v[l][:, :, :past + T]
        y = gqa_attention_ref(q, k, v, past)  # (B, nh, T, hd)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, nh * hd)
        return linear(y, self.w(p + "o_proj"), bias("o_proj"))

    def _mlp(self, l: int, x: np.ndarray) -> np.ndarray:
        p = f"layers.{l}.mlp."
        return linear(swiglu_ref(linear(x, self.w(p + "gate_proj")), linear(x, self.w(p + "up_proj"))),
                      self.w(p + "down_proj"))

    def hidden_states(self, idx: np.ndarray, cache: KVCache | None = None) -> np.ndarray:
        """Final normalized hidden states (B, T, C). With a cache, idx continues its positions."""
        cfg = self.config
        idx = np.asarray(idx)
        B, T = idx.shape
        past = 0 if cache is None else cache.length
        if cache is not None and past + T > cache.max_len:
            raise ValueError(f"the KV cache holds {cache.max_len} positions; {past} used, {T} more asked")
        cos, sin = rope_tables(np.arange(past, past + T), cfg.head_dim, cfg.rope_theta)
        x = self.embed(idx)
        for l in range(cfg.n_layer):
            p = f"layers.{l}."
            x = x + self._attention(l, rmsnorm_ref(x, self.w(p + "input_layernorm"), cfg.rms_norm_eps),
                                    cos, sin, cache, past)
            x = x + self._mlp(l, rmsnorm_ref(x, self.w(p + "post_attention_layernorm"), cfg.rms_norm_eps))
        if cache is not None:
            cache.length = past + T
        return rmsnorm_ref(x, self.w("norm"), cfg.rms_norm_eps)

    def forward(self, idx, targets=None, cache: KVCache | None = None, last_only: bool = False):
        """(logits, loss): logits (B, T, V), or (B, 1, V) with last_only; loss is the mean CE or None."""
        h = self.hidden_states(idx, cache)
        if last_only:
            h = h[:, -1:]
        logits = linear(h, self.w("lm_head"))
        loss = None if targets is None else cross_entropy(logits, targets)
        return logits, loss
