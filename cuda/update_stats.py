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

CHUNK = 16384  # elements a block sums: 128 a thread
ONE, TINY, HUGE = np.float32(1.0), np.float32(1e-6), np.float32(3.0e38)  # float32: Python floats make float64


def stat_chunks(ranges, chunk: int = CHUNK) -> np.ndarray:
    """(n, 3) int64 rows (out row, start, stop) cutting each (out row, start, stop) range of the flat
    arrays into pieces of at most `chunk` elements: the launch's blocks. Empty ranges drop out."""
    rows = [(i, a, min(a + chunk, hi)) for i, lo, hi in ranges for a in range(lo, hi, chunk)]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


@cuda.jit(cache=True)
def update_stats_kernel(out, chunks, params, grads, m, v, decay_mask, norm_sq, hyper):
    """A block per chunk: three block sums, one atomic each into the chunk's row of out."""
    buf = cuda.shared.array(THREADS, float32)
    index, start, stop = chunks[cuda.blockIdx.x, 0], chunks[cuda.blockIdx.x, 1], chunks[cuda.blockIdx.x, 2]
    lr, b1, b2, eps, wd, bc1, bc2, clip = (hyper[0], hyper[1], hyper[2], hyper[3], hyper[4], hyper[5],
                                          hyper[6], hyper[7])
    norm = math.sqrt(norm_sq[0])
    live = norm < HUGE  # NaN or Inf gradients: adamw_update leaves the weights alone
    scale = ONE
    if clip > 0 and norm > clip:
        scale = clip / (norm + TINY)
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
            g = graw * scale
            mi = b1 * m[i] + (ONE - b1) * g
            vi = b2 * v[i] + (ONE - b2) * g * g
            d = -step * mi / (math.sqrt(vi / bc2) + eps)
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


def update_stats(out, chunks, params, grads, m, v, decay_mask, norm_sq, hyper, stream=0):
    """out: float32 (rows, 3), zeroed by the caller; chunks: stat_chunks' rows on the device, indices
    into params..decay_mask (the flat arrays, or the slice of them, that adamw_update is given);
    norm_sq, hyper: the same device buffers as adamw_update's."""
    if chunks.shape[0]:
        update_stats_kernel[chunks.shape[0], THREADS, stream](out, chunks, params, grads, m, v, decay_mask, norm_sq,
                                                              hyper)
