"""The CUDA engine: GPT-2 resident on the GPU, Numba kernels + cuBLASLt (+ cuDNN's attention),
the step replayed as CUDA graphs.

Everything lives in preallocated CuPy buffers (shapes below, N = B*T rows, BH = B*n_head), so a
step launches no allocation and can be captured once and replayed: `zero` (gradients and
accumulators), `micro` and `micro_last` (forward + backward of one micro-batch, adding into the
gradients; the last one of a step also carries the data-parallel bucket all-reduces, see
cuda_dp.py), `norm` (global gradient norm and the instability statistics; the host reads them
and the loss, the one sync of a step) and `update` (clipping and AdamW, one kernel over all
tensors, or over this rank's slice with ZeRO-1). A Python
launch costs ~50 us on an H100 and a step has several hundred launches; a replay costs a few us.

precision.compute picks the arithmetic. bf16 (the shipped cases): every GEMM operand is bf16 (the
weights as a bf16 copy of the float32 master weights, refreshed by AdamW as it updates them; the
activations that feed GEMMs), accumulation in float32; LayerNorm statistics, the gradients and
AdamW's state stay float32, and so does the residual stream unless precision.residual is bf16
(llm.c's choice: at 124M B=16 ~0.6 GB less; with the vector LayerNorm loads 1% faster, 31.53 against
31.69 ms a step, H200; not the default, as it changes the numbers a case trains to). Attention is
cuDNN's fused flash attention when cudnn-frontend is installed (cuda_attention.py). fp32: float32
everywhere, TF32 GEMMs.

Biases, residual adds and GELU ride in the GEMMs' cuBLASLt epilogues (koifish_cuda.cublaslt), so
the only passes of their own are LayerNorm, the classifier, the embedding and two of a block's four
bias gradients: the projections' bias gradients are the column sums of the residual gradient,
which the LayerNorm backward that writes it sums on the way. (cuBLASLt's bias-gradient epilogues
were measured and not taken: on an H200 they slowed the weight-gradient GEMMs by 0.02-0.04 ms
each and the bf16 dGELU GEMM from 0.10 to 0.43 ms.) The LM head runs in chunks of rows, each
chunk's backward GEMMs right after its loss, so the logits never exist whole (_head).

Parameters, names and shapes are exactly the CPU model's, so checkpoints move between the two
engines unchanged. model.remat trades compute for memory: 1 rebuilds the LayerNorm and GELU
outputs in the backward, 2 keeps only each block's output and reruns the block's forward just
before its backward (about a third more forward work; activations shrink by ~L times).
"""

from __future__ import annotations

import math

import numpy as np

import koifish_cuda.compat  # noqa: F401  (before numba compiles)
from koifish_cuda.update_stats import CHUNK as STAT_CHUNK
from koifish_core.config.plan import head_rows
from koifish_core.engine.base import StepResult
from koifish_core.engine.cuda_dp import GradSync, ZeroShards, block_of, host_spans
from koifish_core.engine.staging import Staging
from koifish_core.errors import KoifishError
from koifish_core.train.instability import InstabilityConfig
from koifish_core.models.gpt2 import GPT2, GPT2Config, _views
from koifish_core.train.checkpoint import copy_into


# the gradients a step's first micro-batch writes with beta = 0 GEMMs (_head, _backward's grad): _zero leaves them
GEMM_WRITTEN = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _gemm_written(name: str) -> bool:
    return name == "wte" or name.endswith(GEMM_WRITTEN)


class CUDAEngine:
    def __init__(self, case, seed: int | None = None, attention: str = "auto"):
        """attention: auto (cuDNN's under bf16 when it loads, else cuBLAS'), cudnn or cublas (cuda_attention.py)."""
        try:
            import cupy as cp
            from numba import cuda
        except ImportError as e:
            raise KoifishError(f"the CUDA engine needs CuPy and numba-cuda ({e}); pip install 'koifish[cuda12]' "
                               "or 'koifish[cuda13]'") from None
        if cp.cuda.runtime.getDeviceCount() == 0:
            raise KoifishError("--device cuda: no CUDA GPU is visible")
        from koifish_cuda.cublaslt import CublasLt

        self.cp, self.case = cp, case
        self.cfg = cfg = GPT2Config.from_model_config(case.model)
        host = GPT2(cfg, dtype=np.float32)
        host.init_weights(case.seed if seed is None else seed)
        self.n_params = host.num_parameters()
        self.shapes = cfg.param_shapes()
        self.spans = host_spans(host)  # where each tensor lies in the flat arrays (gradient buckets)
        self.n_flat = host.params.size  # elements of the flat arrays (ZeRO-1 pads them further)
        self.remat = case.model.remat
        self.bf16 = case.precision.compute == "bf16"
        self.attention = attention
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.ns = cuda.external_stream(self.stream.ptr)
        self.staging = Staging(self.stream)  # the step's uploads, queued without a sync
        with self.stream:
            self.lt = CublasLt(self.stream, tf32=True)  # every GEMM but the cuBLAS attention's, with epilogues
            self.params = cp.asarray(host.params)
            self.grads = cp.zeros_like(self.params)
            self.m = cp.zeros_like(self.params)
            self.v = cp.zeros_like(self.params)
            self.decay = cp.asarray(host.decay_mask().astype(np.uint8))
            self.p = _views(self.params, self.shapes)
            self.g = _views(self.grads, self.shapes)
            self._alloc_weights16()
            self._alloc(case.data.batch_size, case.data.seq_len)
        self.adam_step = 0
        # kernel variants written for measurement beside the measured ones (bench/profile_step.py
        # --variants); set before the first step (the graphs capture them)
        # bias_grad "pairs": the 32-bit kernel "groups" replaced (16384 x 3072 bf16 0.039 -> 0.029 ms, x 2304
        # 0.029 -> 0.021, stop 20); adamw "scalar": the 4-byte kernel the 16-byte one replaced (0.923 -> 0.848
        # ms at 124M); classifier "registers": the row kernel "stream" replaced (a 4096-row chunk of GPT-2's
        # logits 0.35 -> 0.30 ms, stop 20); gelu "kernel": c_fc's GEMM with the bias epilogue alone and GELU as
        # a 16-byte pass, PyTorch's split (its step at 124M B=16 on an H200: GEMM 87 us + GELU 63 us a layer,
        # where the GELU epilogue's GEMM took 160 us; results/kernels_step_124M_s21a.json); not yet measured here
        self.variants = {"classifier": "stream", "bias_grad": "groups", "adamw": "vector", "gelu": "epilogue"}
        # the update statistics: large tensors sampled (instability.update_sample; koifish_cuda.update_stats)
        self.stat_sample = InstabilityConfig.from_dict(case.instability).update_sample
        self.stat_chunk = STAT_CHUNK
        self._zero_pieces = None  # the gradient spans _zero clears (koifish_cuda.zero_spans), on the device
        self._chunks = None  # (what it was made from, chunk rows, weights) on the device: _update_stats
        self._groups = None  # instability.TensorGroups of self.spans: _signals
        self._watch = False  # watch_weights: the update graph sums the squares of the weights it writes
        self._params_summed = False  # params_sq holds the current weights' sum of squares (nonfinite_tensor)
        self.graphs = None
        self.collective = None  # data-parallel (attach_collective): NCCL between ranks
        self.sync = None  # GradSync: bucket all-reduces captured inside the last micro-batch graph
        self.zero = None  # ZeroShards: ZeRO-1, m and v hold only this rank's slice

    # ---- data parallel ------------------------------------------------------------------------
    def attach_collective(self, collective, dist_cfg) -> None:
        """Join a data-parallel job: before the first step and before a checkpoint is loaded."""
        self.collective, self.graphs, self._zero_pieces = collective, None, None
        if collective is None or collective.world_size == 1:
            return
        collective.stream = self.stream  # NCCL queues behind the kernels: no host sync
        cp, n = self.cp, self.params.size
        if dist_cfg.zero1:
            # The flat arrays are padded to N equal shards (NCCL's reduce-scatter and all-gather
            # need them); reduce-scatter and all-gather then run in place.
            self.zero = z = ZeroShards(n, collective)
            with self.stream:
                params, grads, decay = cp.zeros(z.plan.padded, cp.float32), cp.zeros(z.plan.padded, cp.float32), \
                    cp.zeros(z.plan.padded, cp.uint8)
                params[:n], decay[:n] = self.params, self.decay
                self.params, self.grads, self.decay = params, grads, decay
                self.m, self.v = (cp.zeros(z.hi - z.lo, cp.float32) for _ in range(2))
                self.p, self.g = _views(self.params, self.shapes), _views(self.grads, self.shapes)
                self._alloc_weights16()
            self.stream.synchronize()
            cp.get_default_memory_pool().free_all_blocks()  # the unsharded buffers go back to the GPU
        elif dist_cfg.overlap:
            self.sync = GradSync(collective, self.spans, int(dist_cfg.bucket_mb * 2**20), self.stream)

    @property
    def shards_optimizer(self) -> bool:
        """True when every rank must take part in optim_tensors() (it gathers the shards)."""
        return self.zero is not None

    def _opt_arrays(self):
        """(params, grads, m, v, decay) that AdamW updates: all of them, or this rank's ZeRO-1 slice."""
        if self.zero is None:
            return self.params, self.grads, self.m, self.v, self.decay
        lo, hi = self.zero.lo, self.zero.hi
        return self.params[lo:hi], self.grads[lo:hi], self.m, self.v, self.decay[lo:hi]

    def _ready(self, names) -> None:
        if self.sync is not None:
            self.sync.tensors_ready(self.grads, names)

    # ---- buffers ------------------------------------------------------------------------------
    def _alloc_weights16(self) -> None:
        """The GEMMs' weights: a bf16 copy of the flat master weights (bf16), or the master itself."""
        if not self.bf16:
            self.params16, self.pw = self.params, self.p
            return
        self.params16 = self.cp.empty(self.params.shape, self.cp.uint16)
        self.pw = _views(self.params16, self.shapes)
        self._refresh_weights16()

    def _refresh_weights16(self) -> None:
        """params16 = bf16(params): after every change of the master weights."""
        if self.bf16:
            from koifish_cuda.bf16 import to_bf16

            to_bf16(self.params16.reshape(1, -1), self.params.reshape(1, -1), self.ns)

    def _alloc(self, B: int, T: int) -> None:
        from koifish_core.engine.cuda_attention import make_attention

        cp, cfg = self.cp, self.cfg
        C, F, L, nh, Vp = cfg.n_embd, cfg.d_ff, cfg.n_layer, cfg.n_head, cfg.padded_vocab_size
        N, BH, hs = B * T, B * nh, C // nh
        self.B, self.T, self.N, self.BH, self.hs = B, T, N, BH, hs
        f = lambda *s: cp.zeros(s, dtype=cp.float32)  # noqa: E731
        h = lambda *s: cp.zeros(s, dtype=cp.uint16 if self.bf16 else cp.float32)  # noqa: E731  GEMM operands
        # the residual stream (precision.residual): float32, or bf16 bits (the kernels and epilogues take either)
        r = h if self.case.precision.residual == "bf16" else f
        self.idx = cp.zeros((B, T), dtype=cp.int32)
        self.targets = cp.zeros(N, dtype=cp.int32)
        self.x0 = r(N, C)  # the embedding's output, the residual stream's start
        self.attn, self.attn_note = make_attention(self.attention, self.bf16, B, T, nh, hs, self.stream, self.ns, f)
        # Per-layer activations kept for the backward (h: a GEMM's operand, bf16 under bf16). Keys in
        # `shared` get one buffer for all layers: qkv unless the attention's backward reads it, and
        # with remat the values the backward rebuilds: level 1 the LayerNorm and GELU outputs, level
        # 2 everything but each block's output (one block is rebuilt at a time, before its backward).
        kinds = dict(ln1=(h, N, C), m1=(f, N), r1=(f, N), qkv=(h, N, 3 * C), atty=(h, N, C), res2=(r, N, C),
                     ln2=(h, N, C), m2=(f, N), r2=(f, N), fch=(h, N, F), fch_gelu=(h, N, F), res3=(r, N, C))
        kinds.update({k: (f, *shape) for k, shape in self.attn.sizes.items()})
        shared = (set() if self.attn.keeps_qkv else {"qkv"}) | ({"ln1", "ln2", "fch_gelu"} if self.remat == 1 else set())
        if self.remat == 2:
            shared = set(kinds) - {"res3"}
        one = {k: kinds[k][0](*kinds[k][1:]) for k in shared}
        self.act = [{k: one[k] if k in shared else new(*shape) for k, (new, *shape) in kinds.items()} for _ in range(L)]
        self.lnf, self.mf, self.rf = h(N, C), f(N), f(N)
        self.head_rows = head_rows(N, Vp, 2 if self.bf16 else 4)  # the LM head's chunk (_head)
        self.logits, self.losses, self.loss_sum = h(self.head_rows, Vp), f(N), f(1)
        # scratch shared by the layers; dres is the residual stream's gradient (precision.residual_grad),
        # dres_g its GEMM operand (a bf16 copy written by the LayerNorm backward, or dres itself); dln, a
        # LayerNorm output's gradient, is a GEMM's product (bf16 under bf16)
        grad16 = self.case.precision.residual_grad == "bf16"
        self.dres, self.dln = (h if grad16 else f)(N, C), h(N, C)
        self.dres_g = h(N, C) if self.bf16 and not grad16 else self.dres
        self.dqkv, self.datty = h(N, 3 * C), h(N, C)  # the MLP's dGELU output goes over the layer's fch_gelu
        self.norm_sq = f(1)
        self.params_sq = f(1)  # written by the update graph, read by nonfinite_tensor
        self.hyper = f(8)
        self.stat_phase = cp.zeros(1, dtype=cp.int32)  # which sampled chunks this step's statistics read
        # Instability signals, read at the step's one sync (_read_report): loss, squared gradient
        # norm, largest logit, then per tensor (self.spans order) the sums of the squared coming
        # update, squared weights and squared gradient (koifish_cuda.update_stats).
        self.report = f(3 + 3 * len(self.shapes))
        self.stats = self.report[3:].reshape(len(self.shapes), 3)
        self.max_logit = cp.full(1, -math.inf, dtype=cp.float32)  # raised by the forward's classifier (eval's too)

    # ---- the step, as kernels -----------------------------------------------------------------
    def _forward(self, dloss: float, backward: bool = False, first: bool = False) -> None:
        """Forward and loss; with backward, the LM head's gradients too (_head); first: the step's first
        micro-batch, whose weight-gradient GEMMs write their gradients instead of adding (beta = 0)."""
        from koifish_cuda.embedding import encoder_forward
        from koifish_cuda.layernorm import layernorm_forward

        p, s = self.p, self.ns
        encoder_forward(self.x0, self.idx, p["wte"], p["wpe"], s)
        resid = self.x0
        for l in range(self.cfg.n_layer):
            self._block_forward(l, resid)
            resid = self.act[l]["res3"]
        layernorm_forward(self.lnf, self.mf, self.rf, resid, p["ln_f.weight"], p["ln_f.bias"], s)
        self._head(dloss, backward, first)

    def _head(self, dloss: float, backward: bool, first: bool = False) -> None:
        """Logits, loss and (backward) their gradients, head_rows rows at a time: the logits buffer
        holds one chunk (the whole (N, Vp) logits are GPT-2's largest activation), the classifier
        writes the chunk's gradient over it, and with backward the chunk's share of wte's gradient
        and of dln follows before the next chunk's logits overwrite it."""
        from koifish_cuda.classifier import fused_classifier

        w, g, s, R = self.pw, self.g, self.ns, self.head_rows
        for r0 in range(0, self.N, R):
            rows = slice(r0, min(r0 + R, self.N))
            logits = self.logits[:rows.stop - r0]
            self.lt.matmul(logits, self.lnf[rows], w["wte"], trans_b=True)  # (R, Vp); padded wte rows are 0
            fused_classifier(logits, self.losses[rows], self.loss_sum, self.targets[rows], self.cfg.vocab_size, dloss,
                             s, max_logit=self.max_logit, variant=self.variants["classifier"])
            if backward:
                self.lt.matmul(g["wte"], logits, self.lnf[rows], trans_a=True,  # (Vp, C) += dlogits^T lnf
                               c=None if first and r0 == 0 else g["wte"])
                self.lt.matmul(self.dln[rows], logits, w["wte"])  # (R, C)

    def _bias(self, name: str, out):
        """A bias in its GEMM output's type: the bf16 copy for a bf16 output, else the master."""
        return (self.pw if out.dtype == self.cp.uint16 else self.p)[name]

    def _block_forward(self, l: int, resid, full: bool = True) -> None:
        """Block l from its input `resid`; full=False stops before the MLP's output projection
        (all a rebuild for the backward needs, and it leaves the block's output untouched).
        Biases, residual adds and GELU ride in the GEMMs' epilogues (koifish_cuda.cublaslt)."""
        from koifish_cuda.gelu import gelu_forward
        from koifish_cuda.layernorm import layernorm_forward

        p, w, s, a, h = self.p, self.pw, self.ns, self.act[l], f"h.{l}."
        linear = self.lt.matmul
        layernorm_forward(a["ln1"], a["m1"], a["r1"], resid, p[h + "ln_1.weight"], p[h + "ln_1.bias"], s)
        linear(a["qkv"], a["ln1"], w[h + "attn.c_attn.weight"], trans_b=True, epilogue="bias",
               bias=self._bias(h + "attn.c_attn.bias", a["qkv"]))
        self.attn.forward(a)
        linear(a["res2"], a["atty"], w[h + "attn.c_proj.weight"], trans_b=True, epilogue="bias",
               bias=self._bias(h + "attn.c_proj.bias", a["res2"]), c=resid)  # res2 = resid + attention's projection
        layernorm_forward(a["ln2"], a["m2"], a["r2"], a["res2"], p[h + "ln_2.weight"], p[h + "ln_2.bias"], s)
        if self.variants["gelu"] == "kernel":  # the bias in the GEMM, GELU a pass of its own
            linear(a["fch"], a["ln2"], w[h + "mlp.c_fc.weight"], trans_b=True, epilogue="bias",
                   bias=self._bias(h + "mlp.c_fc.bias", a["fch"]))
            gelu_forward(a["fch_gelu"], a["fch"], s)
        else:
            linear(a["fch_gelu"], a["ln2"], w[h + "mlp.c_fc.weight"], trans_b=True, epilogue="gelu_aux_bias",
                   bias=self._bias(h + "mlp.c_fc.bias", a["fch_gelu"]), aux=a["fch"])  # fch: the pre-activation
        if full:
            linear(a["res3"], a["fch_gelu"], w[h + "mlp.c_proj.weight"], trans_b=True, epilogue="bias",
                   bias=self._bias(h + "mlp.c_proj.bias", a["res3"]), c=a["res2"])

    def _rebuild(self, l: int, resid_in) -> None:
        """Recompute what remat dropped from block l, just before its backward."""
        from koifish_cuda.gelu import gelu_forward
        from koifish_cuda.layernorm import layernorm_forward

        p, s, a, h = self.p, self.ns, self.act[l], f"h.{l}."
        if self.remat == 2 and l < self.cfg.n_layer - 1:  # the last block's values are still there
            self._block_forward(l, resid_in, full=False)
        elif self.remat == 1:
            layernorm_forward(a["ln1"], a["m1"], a["r1"], resid_in, p[h + "ln_1.weight"], p[h + "ln_1.bias"], s)
            layernorm_forward(a["ln2"], a["m2"], a["r2"], a["res2"], p[h + "ln_2.weight"], p[h + "ln_2.bias"], s)
            gelu_forward(a["fch_gelu"], a["fch"], s)  # fch holds the pre-activation, bias included

    def _backward(self, first: bool = False) -> None:
        from koifish_cuda.embedding import encoder_backward
        from koifish_cuda.layernorm import layernorm_backward
        from koifish_cuda.matmul import bias_grad

        p, w, g, s = self.p, self.pw, self.g, self.ns
        gemm = self.lt.matmul

        def grad(name, dout, x):  # g[name] += dout^T x: a weight's gradient, accumulated over micro-batches
            gemm(g[name], dout, x, trans_a=True, c=None if first else g[name])  # (first: written, not added)

        dres, dres_g = self.dres, self.dres_g  # the residual's gradient, and the GEMMs' copy of it
        groups = self.variants["bias_grad"] == "groups"
        copy = dres_g if dres_g is not dres else None

        def ln_backward(name, x, mean, rstd, proj_bias):
            """dres += LayerNorm backward of dln (dres_g follows); the new dres is the gradient of a
            residual add, whose column sums are proj_bias' gradient (the projection added there)."""
            layernorm_backward(dres, g[name + ".weight"], g[name + ".bias"], self.dln, x, p[name + ".weight"], mean,
                               rstd, s, dx16=copy, dsum=None if proj_bias is None else g[proj_bias])

        dres.fill(0)  # the LM head's backward ran with the forward (_head): dln is ln_f's output gradient
        L = self.cfg.n_layer
        ln_backward("ln_f", self.act[-1]["res3"], self.mf, self.rf, f"h.{L - 1}.mlp.c_proj.bias")
        self._ready(("ln_f.weight", "ln_f.bias"))
        for l in reversed(range(L)):
            a, h = self.act[l], f"h.{l}."
            resid_in = self.x0 if l == 0 else self.act[l - 1]["res3"]
            self._rebuild(l, resid_in)
            # MLP: res3 = res2 + c_proj(gelu(c_fc(ln2(res2)))); c_proj's bias gradient came with dres
            grad(h + "mlp.c_proj.weight", dres_g, a["fch_gelu"])
            dfch = a["fch_gelu"]  # GELU's output is spent: its buffer takes the pre-activation's gradient
            gemm(dfch, dres_g, w[h + "mlp.c_proj.weight"], epilogue="dgelu", aux=a["fch"])
            bias_grad(g[h + "mlp.c_fc.bias"], dfch, s, vector=groups)
            grad(h + "mlp.c_fc.weight", dfch, a["ln2"])
            gemm(self.dln, dfch, w[h + "mlp.c_fc.weight"])
            ln_backward(h + "ln_2", a["res2"], a["m2"], a["r2"], h + "attn.c_proj.bias")
            # attention: res2 = resid_in + c_proj(attn(c_attn(ln1(resid_in))))
            grad(h + "attn.c_proj.weight", dres_g, a["atty"])
            gemm(self.datty, dres_g, w[h + "attn.c_proj.weight"])
            self.attn.backward(a, self.datty, self.dqkv)
            bias_grad(g[h + "attn.c_attn.bias"], self.dqkv, s, vector=groups)
            grad(h + "attn.c_attn.weight", self.dqkv, a["ln1"])
            gemm(self.dln, self.dqkv, w[h + "attn.c_attn.weight"])
            ln_backward(h + "ln_1", resid_in, a["m1"], a["r1"], f"h.{l - 1}.mlp.c_proj.bias" if l else None)
            self._ready([k for k in self.shapes if block_of(k) == l])
        encoder_backward(g["wte"], g["wpe"], dres, self.idx, s)
        self._ready(("wte", "wpe"))

    def _zero(self) -> None:
        """What the first micro-batch adds into: the gradients no beta = 0 GEMM writes (GEMM_WRITTEN)."""
        from koifish_cuda.zero_spans import span_pieces, zero_spans

        if self._zero_pieces is None:
            spans = [(sp.start, sp.stop) for sp in self.spans if not _gemm_written(sp.name)]
            spans.append((self.n_flat, self.grads.size))  # ZeRO-1's padding
            self._zero_pieces = self.cp.asarray(span_pieces(spans))
        zero_spans(self.grads, self._zero_pieces, self.ns)
        self.loss_sum.fill(0)
        self.norm_sq.fill(0)

    def _norm(self) -> None:
        from koifish_cuda.adamw import sum_squares

        sum_squares(self.norm_sq, self._opt_arrays()[1], self.ns)  # ZeRO-1: this rank's part of the sum
        if self.zero is None:  # ZeRO-1 needs the whole norm first: its statistics follow the all-reduce
            self._update_stats()
        self._collect_signals()

    def _update(self) -> None:
        from koifish_cuda.adamw import adamw_update, sum_squares

        # the bf16 copy is refreshed in the same pass; with ZeRO-1 after the all-gather (train_step)
        fresh16 = self.params16 if self.bf16 and self.zero is None else None
        adamw_update(*self._opt_arrays(), self.norm_sq, self.hyper, self.ns, params16=fresh16,
                     vector=self.variants["adamw"] == "vector")
        if self.zero is None and self._watch:  # the weights' sum of squares: finite when they all are
            self.params_sq.fill(0)
            sum_squares(self.params_sq, self.params, self.ns)

    def _capture(self, accum: int) -> None:
        """Run each phase once eagerly (kernels compile, cuBLAS sets up its workspace), then capture."""
        from koifish_cuda.adamw import adamw_update

        cp = self.cp
        dloss = 1.0 / (self.N * accum)

        def micro(first: bool, last: bool):
            def run():
                if self.sync is not None:
                    self.sync.begin(last)  # the last micro-batch all-reduces the gradient buckets
                self._forward(dloss, backward=True, first=first)
                self._backward(first)
                if self.sync is not None:
                    self.sync.end()
            return run

        # a micro-batch of each graph _micro_graph names, in a step's order
        micros = {self._micro_graph(i, accum): micro(i == 0, i == accum - 1)
                  for i in sorted({0, min(1, accum - 1), accum - 1})}
        phases = {"zero": self._zero, **micros, "norm": self._norm, "update": self._update}
        # The eager warm-up updates only a short prefix (it compiles the same kernel), restored
        # after: it must not count as a step, and a full copy of the state would not fit beside
        # the largest models. It also makes the first NCCL calls, which set up connections and
        # cannot be captured.
        head = slice(0, 256)
        params, grads, m, v, decay = self._opt_arrays()
        saved = (params[head].copy(), m[head].copy(), v[head].copy())
        warm = {**phases, "update": lambda: adamw_update(params[head], grads[head], m[head], v[head], decay[head],
                                                         self.norm_sq, self.hyper, self.ns,
                                                         vector=self.variants["adamw"] == "vector")}
        with self.stream:
            for fn in warm.values():
                fn()
            self.stream.synchronize()
            params[head], m[head], v[head] = saved
            graphs = {}
            for name, fn in phases.items():
                self.stream.begin_capture()
                fn()
                graphs[name] = self.stream.end_capture()
        self.graphs, self.graph_accum = graphs, accum
        cp.cuda.Device().synchronize()
        cp.get_default_memory_pool().free_all_blocks()  # the GEMM tuning's scratch outputs go back

    # ---- the Engine interface -------------------------------------------------------------------
    def _load_batch(self, x, y) -> None:
        self.staging.upload(self.idx, x)
        self.staging.upload(self.targets, y)

    def train_step(self, batches, lr: float, gate=None, poison_grads: bool = False) -> StepResult:
        opt = self.case.optimizer
        if self.graphs is None or self.graph_accum != len(batches):
            self._capture(len(batches))
        self.adam_step += 1
        t = self.adam_step
        hyper = np.array([lr, opt.beta1, opt.beta2, opt.eps, opt.weight_decay, 1 - opt.beta1**t, 1 - opt.beta2**t,
                          opt.grad_clip], dtype=np.float32)
        self.graphs["zero"].launch(self.stream)
        for i, (x, y) in enumerate(batches):
            self._load_batch(x, y)
            self.graphs[self._micro_graph(i, len(batches))].launch(self.stream)
        if poison_grads:  # fault injection: a non-finite gradient
            with self.stream:
                self.grads[:1].fill(float("nan"))
        self._average_gradients()
        self.staging.upload(self.hyper, hyper)  # before the norm graph: its update statistics read it
        self.staging.upload(self.stat_phase, self.adam_step % self.stat_sample)
        self.graphs["norm"].launch(self.stream)
        if self.zero is not None:  # each rank summed the squares of its shard: add them up
            self.collective.all_reduce_mean(self.norm_sq)
            with self.stream:
                self.norm_sq *= self.collective.world_size
        # With nothing to judge, the update is queued before the sync, so the GPU does not wait on the host
        # (its kernel leaves everything alone on a non-finite norm). ZeRO-1's statistics run after the sync.
        early = gate is None and self.zero is None
        if early:
            self.graphs["update"].launch(self.stream)
        loss, norm, host = self._read_report()  # one sync per step
        applied = math.isfinite(norm) and (gate is None or gate(loss, norm, self._signals(host)))
        if applied:
            if not early:
                self.graphs["update"].launch(self.stream)
            self._params_summed = self.zero is None and self._watch  # params_sq: the weights just written
            if self.zero is not None:  # every rank updated its slice: share them
                lo, hi = self.zero.lo, self.zero.hi
                self.collective.all_gather(self.params[lo:hi], self.params)
                with self.stream:
                    self._refresh_weights16()
        else:
            self.adam_step -= 1  # no update: Adam's clock does not move
        return StepResult(loss, norm, applied=applied)

    @staticmethod
    def _micro_graph(i: int, n: int) -> str:
        """The graph micro-batch i of n runs: the first writes the weight gradients, the last ends the step."""
        return "micro_last" if i == n - 1 else "micro_first" if i == 0 else "micro"

    def _average_gradients(self) -> None:
        """After the micro-batches: the mean gradient and loss over the ranks (the buckets were
        already queued inside the last micro-batch graph when they overlap backward)."""
        c = self.collective
        if c is None or c.world_size == 1:
            return
        if self.zero is not None:
            lo, hi = self.zero.lo, self.zero.hi
            c.reduce_scatter_mean(self.grads, self.grads[lo:hi])  # in place: this rank's slice of the mean
        elif self.sync is None:
            c.all_reduce_mean(self.grads)
        c.all_reduce_mean(self.loss_sum)

    def watch_weights(self, on: bool) -> None:
        """Before the first step (the update graph is captured then): with on, the update graph also sums
        the squares of the weights it wrote (0.12 ms at 124M), which nonfinite_tensor then reads."""
        self._watch = on

    def poison_params(self) -> None:
        self._params_summed = False
        with self.stream:
            self.params[:1].fill(float("inf"))
            self._refresh_weights16()

    def nonfinite_tensor(self) -> str | None:
        """The first tensor holding a non-finite weight, or None. Right after an update, from the sum of
        squares its graph took of the weights it wrote (one float read, where isfinite over every weight
        took two passes and a temporary); a sum that is not finite (or weights written since) gets the
        exact check."""
        summed, self._params_summed = self._params_summed, False
        with self.stream:
            if summed and math.isfinite(float(self.params_sq.get(stream=self.stream)[0])):
                return None
            if bool(self.cp.isfinite(self.params).all().get()):
                return None
            return next(k for k, v in self.p.items() if not bool(self.cp.isfinite(v).all().get()))

    def eval_loss(self, x, y) -> float:
        with self.stream:
            self.loss_sum.fill(0)
            self._load_batch(x, y)
            self._forward(1.0 / self.N)
            return float(self.loss_sum.get(stream=self.stream)[0])

    def model_tensors(self) -> dict[str, np.ndarray]:
        self.stream.synchronize()
        return {k: self.cp.asnumpy(v) for k, v in self.p.items()}

    def optim_tensors(self) -> dict[str, np.ndarray]:
        """AdamW's state for a checkpoint, whole (with ZeRO-1 gathered from every rank, which must
        all call this), so that the checkpoint does not depend on the number of ranks."""
        step = np.array([self.adam_step], dtype=np.int64)
        if self.zero is None:
            self.stream.synchronize()
            return {"m": self.cp.asnumpy(self.m), "v": self.cp.asnumpy(self.v), "step": step}
        out = {"step": step}
        for key in ("m", "v"):  # one at a time: a full copy of each is large
            full = self.cp.empty(self.zero.plan.padded, self.cp.float32)
            self.collective.all_gather(getattr(self, key), full)
            out[key] = full[:self.zero.plan.n].get(stream=self.stream)
            del full
        return out

    def load_tensors(self, model, optim, where) -> None:
        host = {k: np.empty(s, np.float32) for k, s in self.shapes.items()}
        copy_into(host, model, where)
        with self.stream:
            for k, v in host.items():
                self.p[k].set(v, stream=self.stream)
            if optim is not None:
                n = self.n_flat
                flat = {"m": np.empty(n, np.float32), "v": np.empty(n, np.float32)}
                copy_into(flat, {k: optim[k] for k in ("m", "v") if k in optim}, where)
                for key in ("m", "v"):  # ZeRO-1: this rank's slice of the padded array
                    part = flat[key] if self.zero is None else self.zero.plan.pad(flat[key])[self.zero.lo:self.zero.hi]
                    getattr(self, key).set(part, stream=self.stream)
                self.adam_step = int(optim["step"][0])
            self._refresh_weights16()
        self.stream.synchronize()

    # ---- instability signals: judged before the update, read at the step's one sync ---------------
    def _update_stats(self) -> None:
        """Per tensor, what the coming AdamW update will do (koifish_cuda.update_stats) into
        self.stats: one launch over every tensor, inside a captured graph, tensors of many chunks
        sampled (stat_sample, a phase a step). With ZeRO-1 each rank measures the part of each
        tensor it updates (its estimates scaled to that part; the rows are summed over the ranks)."""
        from koifish_cuda.update_stats import stat_chunks, update_stats

        params, grads, m, v, decay = self._opt_arrays()
        lo = self.zero.lo if self.zero is not None else 0
        hi = lo + params.size
        key = (lo, hi, self.stat_chunk, self.stat_sample)  # what the chunk table is made from
        if self._chunks is None or self._chunks[0] != key:
            ranges = [(i, max(sp.start, lo) - lo, min(sp.stop, hi) - lo) for i, sp in enumerate(self.spans)]
            rows, weights = stat_chunks(ranges, self.stat_chunk, self.stat_sample)
            self._chunks = (key, self.cp.asarray(rows), self.cp.asarray(weights))
        self.stats.fill(0)
        update_stats(self.stats, *self._chunks[1:], self.stat_phase, params, grads, m, v, decay, self.norm_sq,
                     self.hyper, self.ns)

    def _collect_signals(self) -> None:
        """The step's loss and largest logit into the report; the next step's maximum starts over
        (what an eval_loss between steps forwards also counts: the same weights' logits)."""
        self.report[0:1] = self.loss_sum
        self.report[2:3] = self.max_logit
        self.max_logit.fill(-math.inf)

    def _zero1_update_stats(self) -> None:
        """ZeRO-1: the clip factor needs the whole gradient norm, known only after the all-reduce
        that follows the norm graph, so the statistics get a small graph of their own (captured on
        first use, again whenever the step graphs are)."""
        graph = getattr(self, "_stats_graph", None)
        if graph is not None and graph[0] is self.graphs:
            graph[1].launch(self.stream)
            return
        with self.stream:
            self._update_stats()  # this step's statistics, eagerly (the kernel compiles here)
            self.stream.begin_capture()
            self._update_stats()
            self._stats_graph = (self.graphs, self.stream.end_capture())

    def _read_report(self) -> tuple[float, float, np.ndarray]:
        """Loss, gradient norm and the report they came in (_signals reads the rest): one copy of
        self.report, the step's one host sync, before any update."""
        c = self.collective
        if self.zero is not None:
            self._zero1_update_stats()
        with self.stream:
            if c is not None and c.world_size > 1:
                # Every rank must judge the same numbers: the largest logit differs between ranks
                # (their mean, as the CPU engine), and under ZeRO-1 each rank measured its slice.
                c.all_reduce_mean(self.report[2:])
                if self.zero is not None:
                    self.report[3:] *= c.world_size
            self.report[1:2] = self.norm_sq
        host = self.report.get(stream=self.stream)
        return float(host[0]), math.sqrt(float(host[1])), host

    def _signals(self, host: np.ndarray) -> dict:
        """The instability signals in a read report: update_ratio per tensor group (instability.TensorGroups,
        made once), max_logit, tensor (the one with the largest gradient norm)."""
        from koifish_core.train.instability import TensorGroups

        if self._groups is None:
            self._groups = TensorGroups(span.name for span in self.spans)
        names = self._groups.names
        stats = host[3:].reshape(-1, 3).astype(np.float64)
        return {"update_ratio": self._groups.ratios(stats[:, 0], stats[:, 1]), "max_logit": float(host[2]),
                "tensor": names[int(np.argmax(stats[:, 2]))] if names else None}
