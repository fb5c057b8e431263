"""What AdamW is about to do to one tensor, measured before it does it.

For a slice of the flat parameters (one tensor), with the gradients, moments, decay mask,
norm_sq and hyper exactly as adamw_update (koifish_cuda.adamw) will be given them:

    out[index, 0] += sum(dp^2)   dp = the change adamw_update would make to each weight
    out[index, 1] += sum(p^2)    the weights before the update
    out[index, 2] += sum(g^2)    the raw (unclipped) gradient, to name the tensor behind a spike

    dp = -lr * wd * mask * p - (lr / bc1) * m' / (sqrt(v' / bc2) + eps),
    m' = b1 m + (1 - b1) c g,  v' = b2 v + (1 - b2) (c g)^2,  c = the clip factor of adamw_update

so sqrt(out[i, 0] / out[i, 1]) is the tensor's update-to-weight ratio, known before the update
is applied (nothing to undo when it is refused). Nothing is written to params, m or v. As in
adamw_update, a non-finite norm_sq means no update: dp counts as 0. The CUDA engine launches
this once per tensor inside its captured `norm` graph; the reference below computes the same
sums in float64.
"""

import numpy as np


def update_stats_ref(params, grads, m, v, decay_mask, norm_sq: float, hyper) -> tuple[float, float, float]:
    """(sum dp^2, sum p^2, sum g^2) in float64; hyper as adamw_kernel's: lr, beta1, beta2, eps,
    weight_decay, 1 - beta1^t, 1 - beta2^t, grad_clip (0 = off)."""
    lr, b1, b2, eps, wd, bc1, bc2, clip = (float(h) for h in hyper)
    p = np.asarray(params, np.float64).ravel()
    g = np.asarray(grads, np.float64).ravel()
    w_sq, g_sq = float(p @ p), float(g @ g)
    norm = float(np.sqrt(np.float64(norm_sq)))
    if not norm < 3.0e38:
        return 0.0, w_sq, g_sq
    scale = clip / (norm + 1e-6) if clip > 0 and norm > clip else 1.0
    gc = g * scale
    mi = b1 * np.asarray(m, np.float64).ravel() + (1.0 - b1) * gc
    vi = b2 * np.asarray(v, np.float64).ravel() + (1.0 - b2) * gc * gc
    dp = -(lr / bc1) * mi / (np.sqrt(vi / bc2) + eps)
    dp -= np.where(np.asarray(decay_mask).ravel() != 0, lr * wd * p, 0.0)
    return float(dp @ dp), w_sq, g_sq


# ---- CUDA ------------------------------------------------------------------------------------
import math  # noqa: E402

import koifish_cuda.compat  # noqa: E402,F401
from koifish_cuda.reduce import THREADS, block_sum  # noqa: E402
from numba import cuda, float32  # noqa: E402


@cuda.jit(cache=True)
def update_stats_kernel(out, index, params, grads, m, v, decay_mask, norm_sq, hyper):
    """Grid-stride over one tensor's slice; three block sums, one atomic each per block."""
    buf = cuda.shared.array(THREADS, float32)
    lr, b1, b2, eps, wd, bc1, bc2, clip = (hyper[0], hyper[1], hyper[2], hyper[3], hyper[4], hyper[5],
                                          hyper[6], hyper[7])
    norm = math.sqrt(norm_sq[0])
    live = norm < 3.0e38  # NaN or Inf gradients: adamw_update leaves the weights alone
    scale = float32(1.0)
    if clip > 0.0 and norm > clip:
        scale = clip / (norm + 1e-6)
    su = float32(0.0)
    sw = float32(0.0)
    sg = float32(0.0)
    for i in range(cuda.grid(1), params.size, cuda.gridsize(1)):
        p = params[i]
        graw = grads[i]
        sw += p * p
        sg += graw * graw
        if live:
            g = graw * scale
            mi = b1 * m[i] + (1.0 - b1) * g
            vi = b2 * v[i] + (1.0 - b2) * g * g
            d = -(lr / bc1) * mi / (math.sqrt(vi / bc2) + eps)
            if decay_mask[i]:
                d -= lr * wd * p
            su += d * d
    su = block_sum(su, buf)
    sw = block_sum(sw, buf)
    sg = block_sum(sg, buf)
    if cuda.threadIdx.x == 0:
        cuda.atomic.add(out, (index, 0), su)
        cuda.atomic.add(out, (index, 1), sw)
        cuda.atomic.add(out, (index, 2), sg)


def update_stats(out, index: int, params, grads, m, v, decay_mask, norm_sq, hyper, stream=0, blocks=1056):
    """out: float32 (n_tensors, 3), zeroed by the caller; params..decay_mask: the tensor's slices
    of the flat arrays adamw_update is given; norm_sq, hyper: the same device buffers."""
    n = params.size
    if n == 0:
        return
    update_stats_kernel[min(blocks, (n + THREADS - 1) // THREADS), THREADS, stream](
        out, index, params, grads, m, v, decay_mask, norm_sq, hyper)
