"""ZeRO-1: AdamW with its moments sharded over the ranks.

Each rank keeps m and v only for its shard of the flat parameters (1/N of the optimizer memory).
A step: reduce-scatter the gradients (each rank gets the mean of its shard), the global norm
from the shards' sums of squares, clip, AdamW on the shard, all-gather the parameters. The result
equals the unsharded all-reduce + AdamW step; checkpoints gather the moments so they do not
depend on N. The CPU engine runs it with any Collective; the CUDA engine follows the same plan
on its own buffers with NCCL (core/engine/cuda_gpt2.py).
"""

from __future__ import annotations

import math

import numpy as np

from koifish_core.dist.data_parallel import ShardPlan
from koifish_cuda.adamw import adamw_update_ref


class Zero1AdamW:
    def __init__(self, n: int, collective, decay_mask: np.ndarray, dtype=np.float32):
        self.collective = collective
        self.plan = ShardPlan(n, collective.world_size)
        self.lo, self.hi = self.plan.bounds(collective.rank)
        size = self.plan.shard_size
        self.m = np.zeros(size, dtype=dtype)
        self.v = np.zeros(size, dtype=dtype)
        self.decay_mask = self.plan.pad(np.asarray(decay_mask, dtype=bool))[self.lo:self.hi]
        self.step_count = 0
        self._full = np.zeros(self.plan.padded, dtype=dtype)  # padded gradient/parameter staging

    def reduce_gradients(self, grads: np.ndarray) -> tuple[np.ndarray, float]:
        """(this rank's shard of the mean gradient, the global norm of the whole mean gradient)."""
        self._full[:self.plan.n] = grads
        self._full[self.plan.n:] = 0
        shard = np.empty(self.plan.shard_size, dtype=grads.dtype)
        self.collective.reduce_scatter_mean(self._full, shard)
        sq = np.array([np.dot(shard.astype(np.float64), shard.astype(np.float64))])
        self.collective.all_reduce_mean(sq)  # mean of the shards' sums: times N is the whole sum
        return shard, math.sqrt(float(sq[0]) * self.collective.world_size)

    def update(self, params: np.ndarray, grad_shard: np.ndarray, norm: float, lr: float, beta1: float,
               beta2: float, eps: float, weight_decay: float, grad_clip: float = 0.0) -> None:
        """Clip, AdamW on this rank's shard, then all-gather so every rank holds all parameters."""
        if grad_clip and norm > grad_clip:
            grad_shard = grad_shard * np.float32(grad_clip / (norm + 1e-6))  # same factor as the engine's
        self.step_count += 1
        n = self.plan.n
        self._full[:n] = params
        self._full[n:] = 0
        mine = self._full[self.lo:self.hi].copy()
        adamw_update_ref(mine, grad_shard, self.m, self.v, self.decay_mask, self.step_count, lr,
                         beta1, beta2, eps, weight_decay)
        self.collective.all_gather(mine, self._full)
        params[...] = self._full[:n]

    # ---- checkpoints: the full moments, so a run resumes on any number of ranks ----------------
    def full_state(self) -> dict[str, np.ndarray]:
        """m and v of all parameters (every rank must call it: it all-gathers)."""
        out = {}
        for key in ("m", "v"):
            full = np.zeros(self.plan.padded, dtype=self.m.dtype)
            self.collective.all_gather(getattr(self, key), full)
            out[key] = full[:self.plan.n]
        out["step"] = np.array([self.step_count], dtype=np.int64)
        return out

    def load_full_state(self, state: dict[str, np.ndarray]) -> None:
        """Take this rank's shard of full m and v (saved by any number of ranks)."""
        for key in ("m", "v"):
            getattr(self, key)[...] = self.plan.pad(np.asarray(state[key], dtype=self.m.dtype))[self.lo:self.hi]
        self.step_count = int(state["step"][0])
