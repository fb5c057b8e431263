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
adamw_update, a non-finite norm_sq means no update: dp counts as 0. One launch covers every
tensor: the flat arrays are cut into chunks of at most CHUNK elements of one tensor each
(stat_chunks), a block per chunk (a launch per tensor, 148 of them for GPT-2 124M, most too small
to fill the GPU, took 1.7 ms a step on an H200). The reference below computes the sums in float64.

The pass reads the weights, gradients and both moments: 16 bytes a parameter, 25 GB a step at GPT-2
1558M (~9 ms on an H200, more than its AdamW's difference from PyTorch's). With sample = S > 1 a
tensor of at least 8 S chunks is measured on one chunk in S, a different one each step (the
launch's `phase`), its sums scaled by the tensor's size over what was read: estimates whose
relative error is a few per cent of the sums' own spread, far inside what the instability checks
compare them with (update ratios of 1e-3..0.1 in health against a limit of 1).
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
from koifish_cuda.adamw import moments, read_hyper  # noqa: E402
from koifish_cuda.reduce import THREADS, block_sum  # noqa: E402
from numba import cuda, float32  # noqa: E402

CHUNK = 16384  # elements a block sums: 128 a thread


def stat_chunks(ranges, chunk: int = CHUNK, sample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The launch's blocks for (out row, start, stop) ranges of the flat arrays: rows (n, 4) int64
    (out row, start, stop, phase) of at most `chunk` elements, and their weights (n,) float32.
    Ranges of at least 8 * sample chunks are sampled: chunk k has phase k % sample and weight
    (range size) / (elements of the range in that phase); every other chunk phase -1, weight 1.
    Empty ranges drop out."""
    rows, weights = [], []
    for i, lo, hi in ranges:
        starts = list(range(lo, hi, chunk))
        sampled = sample > 1 and len(starts) >= 8 * sample
        per_phase = np.zeros(max(sample, 1))
        for k, a in enumerate(starts):
            per_phase[k % sample if sampled else 0] += min(a + chunk, hi) - a
        for k, a in enumerate(starts):
            phase = k % sample if sampled else -1
            rows.append((i, a, min(a + chunk, hi), phase))
            weights.append((hi - lo) / per_phase[phase] if sampled else 1.0)
    return np.array(rows, dtype=np.int64).reshape(-1, 4), np.array(weights, dtype=np.float32)


@cuda.jit(cache=True)
def update_stats_kernel(out, chunks, weights, phase, params, grads, m, v, decay_mask, norm_sq, hyper):
    """A block per chunk: three block sums, weighted, one atomic each into the chunk's row of out;
    a sampled chunk of another phase than phase[0] returns at once (the whole block: no barrier)."""
    c = cuda.blockIdx.x
    if chunks[c, 3] >= 0 and chunks[c, 3] != phase[0]:
        return
    buf = cuda.shared.array(THREADS, float32)
    index, start, stop = chunks[c, 0], chunks[c, 1], chunks[c, 2]
    # not live: NaN or Inf gradients, adamw_update moves nothing
    live, scale, lr, b1, b2, eps, wd, bc1, bc2 = read_hyper(hyper, norm_sq)
    step = lr / bc1
    su = float32(0.0)
    sw = float32(0.0)
    sg = float32(0.0)
    for i in range(start + cuda.threadIdx.x, stop, cuda.blockDim.x):
        p = params[i]
        graw = grads[i]
        sw += p * p
        sg += graw * graw
        if live:
            mi, vi = moments(graw * scale, m[i], v[i], b1, b2)
            d = -step * mi / (math.sqrt(vi / bc2) + eps)
            if decay_mask[i]:
                d -= lr * wd * p
            su += d * d
    su = block_sum(su, buf)
    sw = block_sum(sw, buf)
    sg = block_sum(sg, buf)
    if cuda.threadIdx.x == 0:
        w = weights[c]
        cuda.atomic.add(out, (index, 0), su * w)
        cuda.atomic.add(out, (index, 1), sw * w)
        cuda.atomic.add(out, (index, 2), sg * w)


def update_stats(out, chunks, weights, phase, params, grads, m, v, decay_mask, norm_sq, hyper, stream=0):
    """out: float32 (rows, 3), zeroed by the caller; chunks, weights: stat_chunks' arrays on the
    device, indices into params..decay_mask (the flat arrays, or the slice of them, that
    adamw_update is given); phase: int32 (1,) on the device, the sampled chunks' phase to measure;
    norm_sq, hyper: the same device buffers as adamw_update's."""
    if chunks.shape[0]:
        update_stats_kernel[chunks.shape[0], THREADS, stream](out, chunks, weights, phase, params, grads, m, v,
                                                              decay_mask, norm_sq, hyper)
