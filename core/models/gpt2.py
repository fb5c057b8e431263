"""GPT-2 in NumPy, forward and backward written out (the CPU path and the reference for the GPU).

Learned positions, pre-LayerNorm blocks, tanh-GELU, tied embeddings. All parameters live in one
flat array with named views (so the optimizer is one fused update and a checkpoint is one
dict); gradients likewise. Linear weights are stored (out, in) as llm.c does.

    wte   (Vp, C)   token embedding, padded to Vp rows; rows >= V stay zero and untrained
    wpe   (maxT, C) position embedding
    h.{l}.ln_1.weight/bias (C)      h.{l}.attn.c_attn.weight (3C, C) / bias (3C)
    h.{l}.attn.c_proj.weight (C, C) / bias (C)
    h.{l}.ln_2.weight/bias (C)      h.{l}.mlp.c_fc.weight (F, C) / bias (F)
    h.{l}.mlp.c_proj.weight (C, F) / bias (C)
    ln_f.weight/bias (C)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from koifish_cuda.attention import attention_backward_ref, attention_forward_ref
from koifish_cuda.classifier import crossentropy_forward_ref, fused_classifier_ref
from koifish_cuda.embedding import encoder_backward_ref, encoder_forward_ref
from koifish_cuda.gelu import gelu_backward_ref, gelu_forward_ref
from koifish_cuda.layernorm import layernorm_backward_ref, layernorm_forward_ref
from koifish_cuda.matmul import matmul_backward_ref, matmul_forward_ref
from koifish_core.errors import ModelError


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    """Tokens the model predicts (the tokenizer's vocabulary)."""
    n_ctx: int = 1024
    """Longest sequence: rows of the position embedding."""
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    ffn: int | None = None
    """Hidden width of the MLP; None means 4 * n_embd."""

    @property
    def d_ff(self) -> int:
        return self.ffn or 4 * self.n_embd

    @property
    def padded_vocab_size(self) -> int:
        # llm.c pads 50257 to 50304 so GEMM tiles divide evenly; tiny vocabularies stay as they are.
        return self.vocab_size if self.vocab_size <= 1024 else -(-self.vocab_size // 128) * 128

    @classmethod
    def from_model_config(cls, m) -> "GPT2Config":
        return cls(vocab_size=m.vocab_size, n_ctx=m.n_ctx, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd,
                   ffn=m.ffn)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        C, F = self.n_embd, self.d_ff
        shapes = {"wte": (self.padded_vocab_size, C), "wpe": (self.n_ctx, C)}
        for l in range(self.n_layer):
            p = f"h.{l}."
            shapes.update({
                p + "ln_1.weight": (C,), p + "ln_1.bias": (C,),
                p + "attn.c_attn.weight": (3 * C, C), p + "attn.c_attn.bias": (3 * C,),
                p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
                p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
                p + "mlp.c_fc.weight": (F, C), p + "mlp.c_fc.bias": (F,),
                p + "mlp.c_proj.weight": (C, F), p + "mlp.c_proj.bias": (C,),
            })
        shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
        return shapes

    def num_parameters(self) -> int:
        """Unpadded count, as Hugging Face reports it (124,439,808 for GPT-2 small)."""
        n = sum(int(np.prod(s)) for s in self.param_shapes().values())
        return n - (self.padded_vocab_size - self.vocab_size) * self.n_embd


def _views(flat: np.ndarray, shapes: dict) -> dict[str, np.ndarray]:
    views, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        views[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    return views


class GPT2:
    def __init__(self, config: GPT2Config, dtype=np.float32):
        if config.n_embd % config.n_head:
            raise ModelError(f"n_embd {config.n_embd} is not divisible by n_head {config.n_head}")
        self.config = config
        self.dtype = np.dtype(dtype)
        self.shapes = config.param_shapes()
        total = sum(int(np.prod(s)) for s in self.shapes.values())
        self.params = np.zeros(total, dtype=self.dtype)
        self.grads = np.zeros(total, dtype=self.dtype)
        self.p = _views(self.params, self.shapes)
        self.g = _views(self.grads, self.shapes)
        self._cache = None
        self.last_max_logit: float | None = None
        """The largest logit of the last forward that ran the fused classifier (training)."""

    # ---- parameters -------------------------------------------------------------------------
    def param_views(self) -> dict[str, np.ndarray]:
        return self.p

    def grad_views(self) -> dict[str, np.ndarray]:
        return self.g

    def num_parameters(self) -> int:
        return self.config.num_parameters()

    def init_weights(self, seed: int) -> None:
        """GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 L)."""
        rng = np.random.default_rng(seed)
        resid_std = 0.02 / np.sqrt(2 * self.config.n_layer)
        for name, view in self.p.items():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                view[...] = 1.0
            elif view.ndim == 1:
                view[...] = 0.0
            else:
                std = resid_std if name.endswith("c_proj.weight") else 0.02
                view[...] = rng.standard_normal(view.shape) * std
        self.p["wte"][self.config.vocab_size:] = 0.0

    def decay_mask(self) -> np.ndarray:
        """Weight decay applies to matrices (embeddings included, as nanoGPT), not to biases or norms."""
        mask = np.zeros(self.params.size, dtype=bool)
        for name, view in _views(mask, self.shapes).items():
            if len(self.shapes[name]) >= 2:
                view[...] = True
        return mask

    def zero_grad(self) -> None:
        self.grads[...] = 0.0

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, idx: np.ndarray, targets: np.ndarray | None = None, need_backward: bool | None = None,
                return_logits: bool = True):
        """idx (B, T) ints -> (logits (B, T, V), mean loss or None). Keeps activations for backward
        when targets are given (need_backward=False skips that, e.g. for evaluation). Training
        passes return_logits=False: the gradient then overwrites the logits buffer (logits is None)."""
        cfg, p = self.config, self.p
        idx = np.asarray(idx)
        B, T = idx.shape
        if T > cfg.n_ctx:
            raise ModelError(f"sequence of {T} tokens is longer than the model's context of {cfg.n_ctx}")
        if idx.size and (idx.min() < 0 or idx.max() >= cfg.vocab_size):
            raise ModelError(f"token id {int(idx.max())} is outside the vocabulary of {cfg.vocab_size}")
        keep = targets is not None if need_backward is None else need_backward
        C, V = cfg.n_embd, cfg.vocab_size
        x = encoder_forward_ref(p["wte"], p["wpe"], idx).astype(self.dtype, copy=False)  # (B, T, C)
        layers = []
        for l in range(cfg.n_layer):
            h = f"h.{l}."
            ln1, m1, r1 = layernorm_forward_ref(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
            qkv = matmul_forward_ref(ln1.reshape(B * T, C), p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])
            qkv = qkv.reshape(B, T, 3 * C)
            atty, att = attention_forward_ref(qkv, cfg.n_head)
            attproj = matmul_forward_ref(atty.reshape(B * T, C), p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
            x2 = x + attproj.reshape(B, T, C)
            ln2, m2, r2 = layernorm_forward_ref(x2, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
            fch = matmul_forward_ref(ln2.reshape(B * T, C), p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"])
            fch_gelu = gelu_forward_ref(fch)
            fcproj = matmul_forward_ref(fch_gelu, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])
            x3 = x2 + fcproj.reshape(B, T, C)
            if keep:
                layers.append((x, ln1, m1, r1, qkv, atty, att, x2, ln2, m2, r2, fch, fch_gelu))
            x = x3
        lnf, mf, rf = layernorm_forward_ref(x, p["ln_f.weight"], p["ln_f.bias"])
        logits = lnf.reshape(B * T, C) @ p["wte"][:V].T  # (B*T, V); padded rows never enter
        loss = None
        if targets is not None:
            targets = np.asarray(targets)
            if keep:
                top = np.full(1, -np.inf)
                losses, dlogits = fused_classifier_ref(logits, targets.ravel(), 1.0 / targets.size,
                                                       inplace=not return_logits, max_logit=top)
                self.last_max_logit = float(top[0])
                self._cache = (idx, layers, x, lnf, mf, rf, dlogits)
                if not return_logits:
                    return None, float(losses.mean())
            else:
                losses = crossentropy_forward_ref(logits, targets.ravel())
            loss = float(losses.mean())
        return logits.reshape(B, T, V), loss

    # ---- backward ---------------------------------------------------------------------------
    def backward(self, grad_scale: float = 1.0) -> None:
        """Adds grad_scale * d(mean loss of the last forward)/d(params) into self.grads."""
        if self._cache is None:
            raise ModelError("backward() needs a forward() with targets first")
        cfg, p, g = self.config, self.p, self.g
        idx, layers, xL, lnf, mf, rf, dlogits = self._cache
        self._cache = None
        B, T = idx.shape
        C, V = cfg.n_embd, cfg.vocab_size
        if grad_scale != 1.0:
            dlogits *= grad_scale
        g["wte"][:V] += dlogits.T @ lnf.reshape(B * T, C)
        dlnf = (dlogits @ p["wte"][:V]).reshape(B, T, C)
        dx, dw, db = layernorm_backward_ref(dlnf, xL, p["ln_f.weight"], mf, rf)
        g["ln_f.weight"] += dw
        g["ln_f.bias"] += db
        for l in reversed(range(cfg.n_layer)):
            h = f"h.{l}."
            x, ln1, m1, r1, qkv, atty, att, x2, ln2, m2, r2, fch, fch_gelu = layers[l]
            dres = dx.reshape(B * T, C)  # gradient flowing into the block's output (x3)
            dfch_gelu, dw, db = matmul_backward_ref(dres, fch_gelu, p[h + "mlp.c_proj.weight"])
            g[h + "mlp.c_proj.weight"] += dw
            g[h + "mlp.c_proj.bias"] += db
            dfch = gelu_backward_ref(fch, dfch_gelu)
            dln2, dw, db = matmul_backward_ref(dfch, ln2.reshape(B * T, C), p[h + "mlp.c_fc.weight"])
            g[h + "mlp.c_fc.weight"] += dw
            g[h + "mlp.c_fc.bias"] += db
            dx2, dw, db = layernorm_backward_ref(dln2.reshape(B, T, C), x2, p[h + "ln_2.weight"], m2, r2)
            g[h + "ln_2.weight"] += dw
            g[h + "ln_2.bias"] += db
            dx2 += dx  # residual
            datty, dw, db = matmul_backward_ref(dx2.reshape(B * T, C), atty.reshape(B * T, C), p[h + "attn.c_proj.weight"])
            g[h + "attn.c_proj.weight"] += dw
            g[h + "attn.c_proj.bias"] += db
            dqkv = attention_backward_ref(datty.reshape(B, T, C), qkv, att, cfg.n_head)
            dln1, dw, db = matmul_backward_ref(dqkv.reshape(B * T, 3 * C), ln1.reshape(B * T, C), p[h + "attn.c_attn.weight"])
            g[h + "attn.c_attn.weight"] += dw
            g[h + "attn.c_attn.bias"] += db
            dx1, dw, db = layernorm_backward_ref(dln1.reshape(B, T, C), x, p[h + "ln_1.weight"], m1, r1)
            g[h + "ln_1.weight"] += dw
            g[h + "ln_1.bias"] += db
            dx = dx1 + dx2  # residual
        encoder_backward_ref(g["wte"], g["wpe"], dx, idx)

    def activation_bytes(self, B: int, T: int) -> int:
        """What forward keeps for backward, in bytes (the plan's memory estimate uses it)."""
        C, F, L, nh, V = self.config.n_embd, self.config.d_ff, self.config.n_layer, self.config.n_head, self.config.vocab_size
        per_layer = B * T * (C * 8 + 3 * C + 2 * F) + B * nh * T * T + 4 * B * T
        return (L * per_layer + B * T * (2 * C + V) + 2 * B * T) * self.dtype.itemsize
