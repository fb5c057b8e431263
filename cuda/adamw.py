"""AdamW over one flat parameter array (decoupled weight decay, masked to matrices).

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + lr * wd * mask * p
The GPU kernel does the same in one launch over all tensors; this is its reference.
"""

import numpy as np


def adamw_update_ref(params: np.ndarray, grads: np.ndarray, m: np.ndarray, v: np.ndarray, decay_mask: np.ndarray,
                     step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """In place on params, m and v; `step` counts from 1."""
    m *= beta1
    m += (1.0 - beta1) * grads
    v *= beta2
    v += (1.0 - beta2) * grads * grads
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    if weight_decay:
        params -= (lr * weight_decay) * np.where(decay_mask, params, 0.0).astype(params.dtype, copy=False)
    params -= (lr / bc1) * m / (np.sqrt(v / bc2) + eps)


def global_norm_ref(grads: np.ndarray) -> float:
    return float(np.sqrt(np.dot(grads.astype(np.float64, copy=False), grads.astype(np.float64, copy=False))))


# ---- CUDA ------------------------------------------------------------------------------------
import math  # noqa: E402

import koifish_cuda.compat  # noqa: E402,F401
from koifish_cuda.bf16 import f32_to_bf16, pack_word  # noqa: E402
from koifish_cuda.reduce import THREADS, block_sum  # noqa: E402
from koifish_cuda.vload import aligned, load4, store4  # noqa: E402
from numba import cuda, float32, uint32  # noqa: E402

ONE, TINY, HUGE = np.float32(1.0), np.float32(1e-6), np.float32(3.0e38)  # float32: Python floats make float64


@cuda.jit(device=True, inline=True)
def clip_scale(norm_sq, clip):
    """(live, scale): whether the gradient norm is finite (else no weight moves), and the factor
    clipping multiplies every gradient by. koifish_cuda.update_stats measures with the same."""
    norm = math.sqrt(norm_sq)
    scale = ONE
    if clip > 0 and norm > clip:
        scale = clip / (norm + TINY)
    return norm < HUGE, scale


@cuda.jit(device=True, inline=True)
def read_hyper(hyper, norm_sq):
    """(live, scale, lr, b1, b2, eps, wd, bc1, bc2) of a step: hyper's values (adamw_kernel's order) and
    clip_scale of the gradient norm norm_sq[0]."""
    live, scale = clip_scale(norm_sq[0], hyper[7])
    return live, scale, hyper[0], hyper[1], hyper[2], hyper[3], hyper[4], hyper[5], hyper[6]


@cuda.jit(device=True, inline=True)
def moments(g, m, v, b1, b2):
    """AdamW's new first and second moments of clipped gradient g."""
    return b1 * m + (ONE - b1) * g, b2 * v + (ONE - b2) * g * g


@cuda.jit(cache=True)
def sum_squares_kernel(out, x):
    """out[0] += sum(x^2) (grid-stride, one atomic per block)."""
    buf = cuda.shared.array(THREADS, float32)
    s = float32(0.0)
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        s += x[i] * x[i]
    s = block_sum(s, buf)
    if cuda.threadIdx.x == 0:
        cuda.atomic.add(out, 0, s)


@cuda.jit(device=True, inline=True)
def _step(p, g, m, v, decay, lr, b1, b2, eps, wd, bc1, bc2, scale):
    """One weight's (p, m, v) after AdamW's step on its gradient g (clipped by scale)."""
    mi, vi = moments(g * scale, m, v, b1, b2)
    if decay:
        p -= lr * wd * p
    return p - (lr / bc1) * mi / (math.sqrt(vi / bc2) + eps), mi, vi


@cuda.jit(cache=True)
def adamw_kernel(params, grads, m, v, decay_mask, norm_sq, hyper, params16):
    """One launch over every tensor. hyper (device, float32): lr, beta1, beta2, eps, weight_decay,
    1 - beta1^t, 1 - beta2^t, grad_clip (0 = off). The clip factor comes from norm_sq[0], computed
    on the device earlier in the same graph, so no host sync is needed. params16, unless empty,
    receives the new weights' bf16 bits (the bf16 GEMMs' copy, refreshed in the same pass)."""
    i = cuda.grid(1)
    if i >= params.size:
        return
    live, scale, lr, b1, b2, eps, wd, bc1, bc2 = read_hyper(hyper, norm_sq)
    if not live:  # NaN or Inf gradients: skip the update everywhere (the trainer logs it)
        return
    p, m[i], v[i] = _step(params[i], grads[i], m[i], v[i], decay_mask[i], lr, b1, b2, eps, wd, bc1, bc2, scale)
    params[i] = p
    if params16.size:
        params16[i] = f32_to_bf16(p)


@cuda.jit(cache=True)
def adamw_vec_kernel(params, grads, m, v, mask_words, norm_sq, hyper, words16):
    """adamw_kernel four weights a thread: params, grads, m and v in 16-byte loads and stores, the four
    decay flags as one 32-bit word, the bf16 copy as two (sizes a multiple of 4, arrays aligned)."""
    i = cuda.grid(1)
    j = 4 * i
    if j >= params.size:
        return
    live, scale, lr, b1, b2, eps, wd, bc1, bc2 = read_hyper(hyper, norm_sq)
    if not live:
        return
    p = cuda.local.array(4, float32)
    g = cuda.local.array(4, float32)
    mm = cuda.local.array(4, float32)
    vv = cuda.local.array(4, float32)
    p[0], p[1], p[2], p[3] = load4(params, j)
    g[0], g[1], g[2], g[3] = load4(grads, j)
    mm[0], mm[1], mm[2], mm[3] = load4(m, j)
    vv[0], vv[1], vv[2], vv[3] = load4(v, j)
    flags = mask_words[i]
    for e in range(4):
        decay = (flags >> uint32(8 * e)) & uint32(0xFF)
        p[e], mm[e], vv[e] = _step(p[e], g[e], mm[e], vv[e], decay, lr, b1, b2, eps, wd, bc1, bc2, scale)
    store4(params, j, p[0], p[1], p[2], p[3])
    store4(m, j, mm[0], mm[1], mm[2], mm[3])
    store4(v, j, vv[0], vv[1], vv[2], vv[3])
    if words16.size:
        words16[2 * i] = pack_word(p[0], p[1])
        words16[2 * i + 1] = pack_word(p[2], p[3])


U4 = 4  # the vector kernel's 16-byte loads in flight a thread (probe_read_bandwidth: 4,453 GB/s at 4 x 128 x 4)


@cuda.jit(cache=True)
def sum_squares_vec_kernel(out, x):
    """out[0] += sum(x^2), x 1-D float32 on a 16-byte boundary: whole turns of the grid in 16-byte loads,
    U4 of them issued before any is used, then the tail (x.size not a multiple of a turn) a value a thread."""
    buf = cuda.shared.array(THREADS, float32)
    nt = cuda.gridsize(1)
    t = cuda.grid(1)
    v = cuda.local.array((U4, 4), float32)
    s = float32(0.0)
    turn = nt * U4
    whole = x.size // 4 // turn * turn  # groups of four in whole turns
    for base in range(t, whole, turn):
        for u in range(U4):
            v[u, 0], v[u, 1], v[u, 2], v[u, 3] = load4(x, 4 * (base + u * nt))
        for u in range(U4):
            s += v[u, 0] * v[u, 0] + v[u, 1] * v[u, 1] + v[u, 2] * v[u, 2] + v[u, 3] * v[u, 3]
    for i in range(4 * whole + t, x.size, nt):
        s += x[i] * x[i]
    s = block_sum(s, buf)
    if cuda.threadIdx.x == 0:
        cuda.atomic.add(out, 0, s)


def sum_squares(out, x, stream=0, blocks=None, vector=True):
    """out[0] += sum(x^2). vector (x on a 16-byte boundary): 16-byte loads, U4 in flight, 1,056 blocks:
    0.117 ms for GPT-2 124M's gradient on the H200, 157% of copy, where the scalar kernel (528 blocks)
    takes 0.261 ms (bench_kernels.py, stop 18); the scalar kernel stays for unaligned views."""
    if vector and aligned(x, 4):
        grid = min(blocks or 1056, max(1, x.size // (4 * U4 * THREADS)))  # no block without a whole turn to read
        sum_squares_vec_kernel[grid, THREADS, stream](out, x)
        return
    sum_squares_kernel[min(blocks or 528, (x.size + THREADS - 1) // THREADS), THREADS, stream](out, x)


def adamw_update(params, grads, m, v, decay_mask, norm_sq, hyper, stream=0, params16=None, vector=True):
    """params16: uint16 bf16 bits of params' shape, refreshed from the updated weights (None: none).
    vector: four weights a thread in 16-byte memory instructions (adamw_vec_kernel; sizes a multiple of
    4, arrays aligned, else the scalar kernel): GPT-2 124M's update 0.923 -> 0.848 ms on the H200
    (bench_kernels.py, stop 19; 141% -> 154% of copy's bytes a second)."""
    if params16 is None:
        params16 = koifish_cuda.compat.device_constant((0,), np.uint16)
    elif params16.shape != params.shape:
        raise ValueError(f"adamw_update: params16 {params16.shape} must be shaped as params {params.shape}")
    if (vector and params.size % 4 == 0 and all(aligned(a, 4) for a in (params, grads, m, v, decay_mask))
            and (params16.size == 0 or aligned(params16, 4))):
        words16 = params16.view(np.uint32) if params16.size else koifish_cuda.compat.device_constant((0,), np.uint32)
        adamw_vec_kernel[(params.size // 4 + 255) // 256, 256, stream](params, grads, m, v, decay_mask.view(np.uint32),
                                                                        norm_sq, hyper, words16)
        return
    adamw_kernel[(params.size + 255) // 256, 256, stream](params, grads, m, v, decay_mask, norm_sq, hyper, params16)
