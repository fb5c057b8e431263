"""Causal multi-head self-attention over a fused qkv projection.

    qkv (B, T, 3C) -> q, k, v (B, nh, T, hs); att = softmax(q k^T / sqrt(hs), causal) (B, nh, T, T);
    out = att v -> (B, T, C)
"""

import numpy as np


def _split_heads(qkv: np.ndarray, n_head: int):
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    q, k, v = (qkv[..., i * C3 // 3:(i + 1) * C3 // 3].reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)
               for i in range(3))  # each (B, nh, T, hs)
    return q, k, v, hs


def attention_forward_ref(qkv: np.ndarray, n_head: int):
    """Returns (out (B, T, C), att (B, nh, T, T)); att is kept for the backward."""
    B, T, _ = qkv.shape
    q, k, v, hs = _split_heads(qkv, n_head)
    scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / np.sqrt(hs))  # (B, nh, T, T)
    scores[..., np.triu(np.ones((T, T), dtype=bool), k=1)] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    att = np.exp(scores, out=scores)
    att /= att.sum(axis=-1, keepdims=True)
    out = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, n_head * hs)
    return out, att


def attention_backward_ref(dout: np.ndarray, qkv: np.ndarray, att: np.ndarray, n_head: int) -> np.ndarray:
    """Returns dqkv (B, T, 3C)."""
    B, T, C = dout.shape
    q, k, v, hs = _split_heads(qkv, n_head)
    dout_h = dout.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)  # (B, nh, T, hs)
    datt = dout_h @ v.transpose(0, 1, 3, 2)
    dv = att.transpose(0, 1, 3, 2) @ dout_h
    # softmax backward; masked entries have att == 0 so their gradient vanishes by itself
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True))
    dscores *= 1.0 / np.sqrt(hs)
    dq = dscores @ k
    dk = dscores.transpose(0, 1, 3, 2) @ q
    merge = lambda t: t.transpose(0, 2, 1, 3).reshape(B, T, C)  # noqa: E731
    return np.concatenate([merge(dq), merge(dk), merge(dv)], axis=-1)
