"""The CPU engine: the NumPy GPT-2 and AdamW, float32, one step at a time."""

from __future__ import annotations

import numpy as np

from koifish_cuda.adamw import adamw_update_ref, global_norm_ref
from koifish_core.engine.base import StepResult
from koifish_core.models.gpt2 import GPT2, GPT2Config, _views
from koifish_core.train.checkpoint import copy_into
from koifish_core.train.instability import largest_tensor, update_ratios


class CPUEngine:
    def __init__(self, case, seed: int | None = None):
        self.case = case
        self.model = GPT2(GPT2Config.from_model_config(case.model), dtype=np.float32)
        self.model.init_weights(case.seed if seed is None else seed)
        self.n_params = self.model.num_parameters()
        self.m = np.zeros_like(self.model.params)
        self.v = np.zeros_like(self.model.params)
        self.adam_step = 0
        self.decay_mask = self.model.decay_mask()
        self.collective = None  # data-parallel: averages gradients and loss across ranks
        self.zero = None  # ZeRO-1 (Zero1AdamW): this rank keeps AdamW's moments for its shard only

    def attach_collective(self, collective, dist_cfg) -> None:
        """Join a data-parallel job (before the first step and before a checkpoint is loaded)."""
        self.collective = collective
        if collective is not None and collective.world_size > 1 and dist_cfg.zero1:
            from koifish_core.dist.zero1 import Zero1AdamW

            self.zero = Zero1AdamW(self.model.params.size, collective, self.decay_mask)
            self.m = self.v = None  # the whole moments live nowhere: each rank holds its shard

    @property
    def shards_optimizer(self) -> bool:
        """True when every rank must take part in optim_tensors() (it gathers the shards)."""
        return self.zero is not None

    def train_step(self, batches, lr: float, gate=None, poison_grads: bool = False) -> StepResult:
        opt = self.case.optimizer
        model = self.model
        model.zero_grad()
        losses, max_logit = [], -np.inf
        for x, y in batches:
            _, loss = model.forward(x, y, return_logits=False)
            max_logit = max(max_logit, model.last_max_logit)  # kept by the classifier before it overwrites them
            model.backward(grad_scale=1.0 / len(batches))
            losses.append(loss)
        if poison_grads:  # fault injection: a non-finite gradient
            model.grads[0] = np.nan
        loss = float(np.mean(losses))
        if self.collective is not None:
            if self.zero is None:
                self.collective.all_reduce_mean(model.grads)
            shared = np.array([loss, max_logit], dtype=np.float64)  # every rank must judge the same numbers
            self.collective.all_reduce_mean(shared)
            loss, max_logit = float(shared[0]), float(shared[1])
        if self.zero is not None:
            return self._zero1_step(loss, max_logit, lr, gate)
        norm = global_norm_ref(model.grads)
        if not np.isfinite(norm):
            return StepResult(loss, norm, applied=False)
        if gate is not None:
            # The update is made, measured, and undone if the gate refuses it: the update ratio is a
            # property of the update itself. Three copies of the parameters are cheap next to a step.
            saved = (model.params.copy(), self.m.copy(), self.v.copy(), self.adam_step)
        if opt.grad_clip and norm > opt.grad_clip:
            model.grads *= np.float32(opt.grad_clip / (norm + 1e-6))
        self.adam_step += 1
        adamw_update_ref(model.params, model.grads, self.m, self.v, self.decay_mask, self.adam_step, lr,
                         opt.beta1, opt.beta2, opt.eps, opt.weight_decay)
        if gate is not None and not self._kept(gate, saved[0], loss, norm, max_logit):
            model.params[...], self.m[...], self.v[...], self.adam_step = saved
            return StepResult(loss, norm, applied=False)
        return StepResult(loss, norm)

    def _kept(self, gate, before_flat, loss: float, norm: float, max_logit: float) -> bool:
        """The gate's verdict on the update just made (before_flat: the weights before it)."""
        model = self.model
        views = model.param_views()
        before = _views(before_flat, {k: v.shape for k, v in views.items()})
        ratios = update_ratios(before, {k: views[k] - before[k] for k in before})
        # The tensor to blame for a gradient spike (with ZeRO-1: this rank's own gradient; only rank 0 logs).
        blame = largest_tensor({k: float(np.dot(g.ravel(), g.ravel())) for k, g in model.grad_views().items()})
        return gate(loss, norm, {"update_ratio": ratios, "max_logit": max_logit, "tensor": blame})

    def _zero1_step(self, loss: float, max_logit: float, lr: float, gate) -> StepResult:
        """ZeRO-1: reduce-scatter the gradient, AdamW on this rank's shard, all-gather the
        parameters; judged by the gate as the whole step is (and undone if refused)."""
        opt, z, model = self.case.optimizer, self.zero, self.model
        shard, norm = z.reduce_gradients(model.grads)
        if not np.isfinite(norm):
            return StepResult(loss, norm, applied=False)
        saved = (model.params.copy(), z.m.copy(), z.v.copy(), z.step_count) if gate is not None else None
        z.update(model.params, shard, norm, lr, opt.beta1, opt.beta2, opt.eps, opt.weight_decay, opt.grad_clip)
        self.adam_step = z.step_count
        if gate is not None and not self._kept(gate, saved[0], loss, norm, max_logit):
            model.params[...], z.m[...], z.v[...], z.step_count = saved
            self.adam_step = z.step_count
            return StepResult(loss, norm, applied=False)
        return StepResult(loss, norm)

    def poison_params(self) -> None:
        """Fault injection: one weight becomes infinite."""
        self.model.params[0] = np.inf

    def watch_weights(self, on: bool) -> None:
        pass  # nonfinite_tensor reads the host arrays directly

    def nonfinite_tensor(self) -> str | None:
        """Name of the first parameter tensor holding NaN or Inf, if any."""
        if np.isfinite(self.model.params).all():
            return None
        return next(k for k, v in self.model.param_views().items() if not np.isfinite(v).all())

    def eval_loss(self, x, y) -> float:
        return self.model.forward(x, y, need_backward=False)[1]

    def model_tensors(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.model.param_views().items()}

    def optim_tensors(self) -> dict[str, np.ndarray]:
        if self.zero is not None:  # every rank calls this: the shards are gathered
            return self.zero.full_state()
        return {"m": self.m.copy(), "v": self.v.copy(), "step": np.array([self.adam_step], dtype=np.int64)}

    def load_tensors(self, model, optim, where) -> None:
        copy_into(self.model.param_views(), model, where)
        if optim is not None and self.zero is not None:
            n = self.model.params.size
            full = {"m": np.zeros(n, np.float32), "v": np.zeros(n, np.float32)}
            copy_into(full, {k: optim[k] for k in ("m", "v") if k in optim}, where)
            self.zero.load_full_state({**full, "step": optim["step"]})
            self.adam_step = self.zero.step_count
        elif optim is not None:
            copy_into({"m": self.m, "v": self.v}, {k: optim[k] for k in ("m", "v") if k in optim}, where)
            self.adam_step = int(optim["step"][0])

