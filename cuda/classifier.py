"""Softmax cross-entropy over the vocabulary, fused with its gradient.

    logits (N, V) , targets (N,) -> losses (N,), dlogits = (softmax - onehot) * dloss
The GPU kernel does both in one pass and writes dlogits over the logits, so probabilities and
logits never exist side by side; the reference below computes the same numbers. Both also raise
max_logit[0] to the largest logit seen (the softmax needs each row's maximum anyway): logits that
grow without bound are an instability signal, and once dlogits overwrite them they are gone.
"""

import numpy as np


def crossentropy_forward_ref(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-row losses; rows are the last axis."""
    m = logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=-1)) + m[..., 0]
    return lse - np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def fused_classifier_ref(logits: np.ndarray, targets: np.ndarray, dloss: float, inplace: bool = False,
                         max_logit: np.ndarray | None = None):
    """Returns (losses, dlogits). dloss is the gradient of the total loss w.r.t. each row's loss
    (1/N for a mean). With inplace=True the logits buffer is overwritten by dlogits. max_logit (a
    1-element array), when given, is raised to the largest logit (NaN counts as missing, as in
    cuda.atomic.max), so one buffer collects the maximum over several calls."""
    probs = logits if inplace else logits.copy()
    row_max = probs.max(axis=-1, keepdims=True)
    if max_logit is not None and row_max.size:
        max_logit[0] = np.fmax(max_logit[0], np.nanmax(row_max) if not np.isnan(row_max).all() else np.nan)
    probs -= row_max
    np.exp(probs, out=probs)
    sums = probs.sum(axis=-1, keepdims=True)
    probs /= sums
    rows = np.arange(targets.size)
    flat = probs.reshape(-1, probs.shape[-1])
    t = targets.ravel()
    losses = -np.log(np.maximum(flat[rows, t], np.finfo(probs.dtype).tiny)).reshape(targets.shape)
    flat[rows, t] -= 1.0
    probs *= dloss
    return losses, probs


# ---- CUDA ------------------------------------------------------------------------------------
import functools  # noqa: E402
import math  # noqa: E402

import koifish_cuda.compat  # noqa: E402,F401
from koifish_cuda.bf16 import load, pack_word, store, word_hi, word_lo  # noqa: E402
from koifish_cuda.reduce import NEG_INF, THREADS, block_max, block_reduce_warps, block_sum  # noqa: E402
from koifish_cuda.vload import aligned, load4, store4  # noqa: E402
from numba import config, cuda, float32, int32, uint32  # noqa: E402

MAX_PER = 32  # most 32-bit words (two bf16 logits) a thread of the bf16 kernels holds in registers
SHARED_WORDS = 11264  # words of a row the "split" kernel keeps in shared memory (44 KB of the 48 KB static limit)
ONE, ZERO = float32(1.0), float32(0.0)


@cuda.jit(device=True, inline=True)
def _word_max(mt, u, c, V):
    """mt raised by the logits of word u (columns c and c + 1; those at or past V are padding)."""
    if c < V:
        mt = max(mt, word_lo(u))
    if c + 1 < V:
        mt = max(mt, word_hi(u))
    return mt


@cuda.jit(device=True, inline=True)
def _word_sum(st, u, c, V, m):
    if c < V:
        st += math.exp(word_lo(u) - m)
    if c + 1 < V:
        st += math.exp(word_hi(u) - m)
    return st


@cuda.jit(device=True, inline=True)
def _word_grad(u, c, V, m, inv, tgt, dloss):
    """The word's two gradients dloss * (softmax - onehot), packed as bf16 (0 over the padding)."""
    lo = ZERO
    hi = ZERO
    if c < V:
        lo = (math.exp(word_lo(u) - m) * inv - (ONE if c == tgt else ZERO)) * dloss
    if c + 1 < V:
        hi = (math.exp(word_hi(u) - m) * inv - (ONE if c + 1 == tgt else ZERO)) * dloss
    return pack_word(lo, hi)


PAD_WORD = uint32(0xFF62FF62)  # two bf16 -3.0e38: a padding column's exp is 0, it raises no maximum
LO_BITS, HI_BITS = uint32(0xFFFF), uint32(0xFFFF0000)


@cuda.jit(device=True, inline=True)
def _mask_padding(u, c, V):
    """Word u of columns c, c + 1 with the columns at or past V made PAD_WORD's halves."""
    if c >= V:
        return PAD_WORD
    if c + 1 >= V:
        return (u & LO_BITS) | (PAD_WORD & HI_BITS)
    return u


L2E = float32(1.4426950408889634)  # exp(x - m) = exp2(x L2E - m L2E): one FFMA and one MUFU.EX2


@cuda.jit(device=True, inline=True)
def _word_exps(u, ml):
    """exp(x - m) of the word's two logits, ml = m * L2E."""
    return math.exp2(word_lo(u) * L2E - ml), math.exp2(word_hi(u) * L2E - ml)


@cuda.jit(device=True, inline=True)
def _word_grad_fast(u, ml, f):
    """dloss * softmax of the word's two logits (f = dloss / sum), as bf16: no target, no padding check
    (padding is PAD_WORD: 0)."""
    lo, hi = _word_exps(u, ml)
    return pack_word(lo * f, hi * f)


@cuda.jit(device=True, inline=True)
def _target_word(words, row, tgt, t):
    """(word, logit) of the row's target for thread 0 ((0, 0) for the others): read before any thread
    can overwrite the row (the row kernels' first barrier is in their reduction)."""
    if t != 0:
        return uint32(0), ZERO
    w = words[row, tgt // 2]
    return w, (word_lo(w) if tgt % 2 == 0 else word_hi(w))


@cuda.jit(device=True, inline=True)
def _finish_row(words, row, tgt, t, w, xt, V, m, s, dloss, losses, loss_sum, max_logit):
    """After a barrier behind the row's stores (the target's owner stored its word without the one-hot):
    thread 0 rewrites the target's word from w, and records the loss, the loss sum and the maximum."""
    if t == 0:
        words[row, tgt // 2] = _word_grad(w, tgt - tgt % 2, V, m, ONE / s, tgt, dloss)
        loss = math.log(s) + m - xt
        losses[row] = loss
        cuda.atomic.add(loss_sum, 0, loss * dloss)
        cuda.atomic.max(max_logit, 0, m)


@functools.lru_cache(maxsize=None)
def _bf16_rows_kernel(PER4: int, SHK: int, NT: int, PER_SM: int, VEC: bool):
    """A block of NT threads per row: the groups of four words t + NT k (k < PER4) in each thread's
    registers, the SHK * NT words after them in shared memory. "registers" (SHK = 0, 1024 threads):
    a whole GPT-2 row in registers, one block an SM. "split" (512 threads, 44 KB of the row in
    shared memory): two blocks, so two rows, an SM, one block's reductions and exponentials
    overlapping the other's loads. VEC: a group is one 16-byte load and store (the row's words a
    multiple of 4, aligned; vload.py), else four bounds-checked scalar ones. The registers' groups
    are checked once each, not a column at a time: a group reaching past V has its padding made
    PAD_WORD as it loads, and only the group holding the target takes the one-hot (the per-column
    checks on 64-bit indices and the integer bf16 rounding were ~54 instructions a logit, stop 18)."""
    PER = 4 * PER4  # sizes must be plain constants
    REG = PER * NT  # words held in registers (the shared part starts there)
    SHW = max(SHK * NT, 1)
    BUF = NT if config.ENABLE_CUDASIM else 1  # the simulator's warp reductions go through shared memory
    # launch bounds: registers for NT threads, PER_SM blocks an SM (unbounded, ptxas took more than
    # 1024 threads can have: the launch failed); the simulator takes no such option
    bounds = {} if config.ENABLE_CUDASIM else {"launch_bounds": (NT, PER_SM)}
    # cached on disk keyed by the closure's cells (PER4, SHK, NT, ...): two plans that differ only
    # in PER_SM (tiny rows) share an entry, which changes register limits, not results

    @cuda.jit(cache=True, fastmath=True, **bounds)
    def kernel(words, losses, loss_sum, targets, V, dloss, max_logit):
        """bf16 logits read as words (N, Vp/2) uint32 (two logits a word, the lower column in the
        low half), the row held on chip: read once and written once, where the generic kernel
        reads it twice."""
        N, W = words.shape
        W = int32(W)  # 32-bit index arithmetic (64-bit compares were two instructions each)
        V = int32(V)
        buf = cuda.shared.array(BUF, float32)
        wbuf = cuda.shared.array(32, float32)
        sh = cuda.shared.array(SHW, uint32)
        row, t = cuda.blockIdx.x, int32(cuda.threadIdx.x)
        tgt = int32(targets[row])
        w, xt = _target_word(words, row, tgt, t)
        x = cuda.local.array(PER, uint32)
        mt = NEG_INF
        for k in range(PER4):
            j = int32(4 * t + 4 * k * NT)  # 32-bit compares (Numba types int32 arithmetic int64)
            if j >= W:  # a group past the row: nothing to load, nothing to add
                for e in range(4):
                    x[4 * k + e] = PAD_WORD
                continue
            if VEC:
                x[4 * k], x[4 * k + 1], x[4 * k + 2], x[4 * k + 3] = load4(words, (row, j))
            else:
                for e in range(4):
                    x[4 * k + e] = words[row, j + e] if j + e < W else PAD_WORD
            if int32(2 * j + 8) > V:  # the row's end: its padding masked
                for e in range(4):
                    x[4 * k + e] = _mask_padding(x[4 * k + e], 2 * (j + e), V)
            for e in range(4):
                mt = max(mt, max(word_lo(x[4 * k + e]), word_hi(x[4 * k + e])))
        for k in range(SHK):
            j = REG + t + k * NT
            if j < W:
                sh[t + k * NT] = words[row, j]
                mt = _word_max(mt, sh[t + k * NT], 2 * j, V)
        m = block_reduce_warps(mt, buf, wbuf, True)
        st = ZERO
        ml = m * L2E
        for k in range(PER4):
            for e in range(4):
                lo, hi = _word_exps(x[4 * k + e], ml)
                st += lo + hi
        for k in range(SHK):
            j = REG + t + k * NT
            if j < W:
                st = _word_sum(st, sh[t + k * NT], 2 * j, V, m)
        s = block_reduce_warps(st, buf, wbuf, False)
        inv = ONE / s
        f = inv * dloss
        for k in range(PER4):
            j = int32(4 * t + 4 * k * NT)
            if j >= W:
                continue
            if VEC:
                store4(words, (row, j), _word_grad_fast(x[4 * k], ml, f), _word_grad_fast(x[4 * k + 1], ml, f),
                       _word_grad_fast(x[4 * k + 2], ml, f), _word_grad_fast(x[4 * k + 3], ml, f))
            else:
                for e in range(4):
                    if j + e < W:
                        words[row, j + e] = _word_grad_fast(x[4 * k + e], ml, f)
        for k in range(SHK):
            j = REG + t + k * NT
            if j < W:
                words[row, j] = _word_grad(sh[t + k * NT], 2 * j, V, m, inv, tgt, dloss)
        cuda.syncthreads()
        _finish_row(words, row, tgt, t, w, xt, V, m, s, dloss, losses, loss_sum, max_logit)

    return kernel


def _bf16_plan(Vp: int, variant: str = "registers"):
    """(PER4, SHK, NT, blocks an SM) of a bf16 row kernel for rows of Vp logits, or None (odd width,
    or too wide for the variant). GPT-2's 50304 columns (25152 words): "registers" 7 groups of four
    words x 1024 threads; "split" 7 groups x 512 threads in registers and 22 words x 512 in shared
    memory."""
    W = Vp // 2
    if Vp % 2:
        return None
    nt = 32
    while nt < (1024 if variant == "registers" else 512) and nt * 16 < W:  # ~16+ words a thread
        nt *= 2
    shk = 0
    if variant == "split":
        shk = min(SHARED_WORDS // nt, max(0, W // nt - 4))  # at least one group a thread in registers
    per4 = -(-(W - shk * nt) // (4 * nt))
    return (per4, shk, nt, 1 if variant == "registers" else 2) if 4 * per4 <= MAX_PER else None


# The "stream" kernel's block at most and blocks an SM: ptxas gives it 53-59 registers, so 544 x 2 fit
# with no spills (1024 x 2 spilled at 32). Its block is the fewest whole warps that take a row in as few
# turns as STREAM_THREADS would (stream_threads): at GPT-2's 25152 words 544 threads take six turns of two
# groups a thread where 512 took seven, the last 14% full (bench_kernels --sweep, a 4096-row chunk on an
# H200: 0.300 -> 0.293 ms, stop 21).
STREAM_THREADS, STREAM_PER_SM = 544, 2
STREAM_ROWS = 264  # its blocks (2 an SM of an H100/H200), each walking rows: the rows being read at once
# (~100 KB each, 26 MB in all) stay in L2 until the second pass reads them again
STREAM_UNROLL = 2  # groups a thread loads before it uses them (bytes in flight)
PAD_LIMIT = float32(-1e38)  # below any real logit, above PAD_WORD's -3e38


@cuda.jit(device=True, inline=True)
def _load_group(words, row, j, W, V):
    """Group j (four words at j) of a row as (x0, x1, x2, x3), PAD_WORD past W and its padding columns
    (at or past V) masked; j a multiple of 4, the row's words a multiple of 4 and aligned."""
    if j >= W:
        return PAD_WORD, PAD_WORD, PAD_WORD, PAD_WORD
    x0, x1, x2, x3 = load4(words, (row, j))
    if int32(2 * j + 8) > V:
        x0, x1 = _mask_padding(x0, 2 * j, V), _mask_padding(x1, 2 * j + 2, V)
        x2, x3 = _mask_padding(x2, 2 * j + 4, V), _mask_padding(x3, 2 * j + 6, V)
    return x0, x1, x2, x3


@cuda.jit(device=True, inline=True)
def _group_max(x0, x1, x2, x3):
    return max(max(max(word_lo(x0), word_hi(x0)), max(word_lo(x1), word_hi(x1))),
               max(max(word_lo(x2), word_hi(x2)), max(word_lo(x3), word_hi(x3))))


@cuda.jit(device=True, inline=True)
def _group_sum(x0, x1, x2, x3, ml):
    a0, b0 = _word_exps(x0, ml)
    a1, b1 = _word_exps(x1, ml)
    a2, b2 = _word_exps(x2, ml)
    a3, b3 = _word_exps(x3, ml)
    return ((a0 + b0) + (a1 + b1)) + ((a2 + b2) + (a3 + b3))


@functools.lru_cache(maxsize=None)
def _bf16_stream_kernel(NT: int, U: int, PER_SM: int = 2):
    """The "stream" variant: a block of NT threads walks rows (grid-stride); a row is read twice in groups
    of four words (16-byte loads, U in flight a thread), the first pass keeping a running maximum and
    sum of exponentials (the sum rescaled when the maximum grows), the second writing the gradient over
    the logits. Registers hold a few groups, not the row, so two blocks share an SM and one's loads
    overlap the other's arithmetic and stores, where the "registers" kernel (one row an SM) waits on
    its loads; the second read finds the row in L2 (STREAM_ROWS rows, ~26 MB, are read at once)."""
    BUF = NT if config.ENABLE_CUDASIM else 1
    XS = 4 * U  # a local array's size must be a plain constant, not an expression
    bounds = {} if config.ENABLE_CUDASIM else {"launch_bounds": (NT, PER_SM)}

    @cuda.jit(cache=True, fastmath=True, **bounds)
    def kernel(words, losses, loss_sum, targets, V, dloss, max_logit):
        N, W = words.shape
        W = int32(W)
        V = int32(V)
        buf = cuda.shared.array(BUF, float32)
        wbuf = cuda.shared.array(32, float32)
        t = int32(cuda.threadIdx.x)
        xs = cuda.local.array(XS, uint32)
        step = int32(4 * NT * U)
        for row in range(cuda.blockIdx.x, N, cuda.gridDim.x):
            tgt = int32(targets[row])
            w, xt = _target_word(words, row, tgt, t)
            mt = NEG_INF
            st = ZERO
            for base in range(4 * t, W, step):
                for u in range(U):  # the loads first: they are what the pass waits on
                    xs[4 * u], xs[4 * u + 1], xs[4 * u + 2], xs[4 * u + 3] = _load_group(words, row, base + 4 * NT * u, W, V)
                for u in range(U):
                    mg = _group_max(xs[4 * u], xs[4 * u + 1], xs[4 * u + 2], xs[4 * u + 3])
                    if mg < PAD_LIMIT:  # all padding: nothing to add (and -3e38 * L2E would overflow)
                        continue
                    if mg > mt:
                        st *= math.exp2((mt - mg) * L2E)
                        mt = mg
                    st += _group_sum(xs[4 * u], xs[4 * u + 1], xs[4 * u + 2], xs[4 * u + 3], mt * L2E)
            m = block_reduce_warps(mt, buf, wbuf, True)
            s = block_reduce_warps(st * math.exp2((mt - m) * L2E) if st > ZERO else ZERO, buf, wbuf, False)
            ml = m * L2E
            inv = ONE / s
            f = inv * dloss
            for base in range(4 * t, W, step):
                for u in range(U):
                    xs[4 * u], xs[4 * u + 1], xs[4 * u + 2], xs[4 * u + 3] = _load_group(words, row, base + 4 * NT * u, W, V)
                for u in range(U):
                    j = base + 4 * NT * u
                    if j < W:
                        store4(words, (row, j), _word_grad_fast(xs[4 * u], ml, f), _word_grad_fast(xs[4 * u + 1], ml, f),
                               _word_grad_fast(xs[4 * u + 2], ml, f), _word_grad_fast(xs[4 * u + 3], ml, f))
            cuda.syncthreads()
            _finish_row(words, row, tgt, t, w, xt, V, m, s, dloss, losses, loss_sum, max_logit)
            cuda.syncthreads()  # the block's threads start the next row together

    return kernel


@cuda.jit(cache=True, fastmath=True)  # __expf: 2 ulp, far inside what a loss and its gradient need
def fused_classifier_kernel(logits, losses, loss_sum, targets, V, dloss, max_logit):
    """One block per row of logits (N, Vp): loss of the row, and the row overwritten by
    dloss * (softmax - onehot) over the first V columns, 0 over the padding. loss_sum[0]
    collects the mean loss (dloss = 1/N); max_logit[0] is raised to the row's largest logit
    (one atomic per row; the caller resets it to -inf when a new maximum is wanted). The maximum
    and the sum of exponentials come from one pass (each thread rescales its sum when its
    maximum grows), so the row is read twice, not three times."""
    N, Vp = logits.shape
    buf = cuda.shared.array(THREADS, float32)
    row, tid = cuda.blockIdx.x, cuda.threadIdx.x
    mt = NEG_INF
    st = float32(0.0)
    for j in range(tid, V, THREADS):
        x = load(logits, (row, j))
        if x > mt:
            st = st * math.exp(mt - x) + float32(1.0)
            mt = x
        else:
            st += math.exp(x - mt)
    m = block_max(mt, buf)
    s = block_sum(st * math.exp(mt - m), buf)
    tgt = targets[row]
    loss = math.log(s) + m - load(logits, (row, tgt))
    cuda.syncthreads()  # every thread has read logits[row, tgt] before it is overwritten
    inv = float32(1.0) / s
    for j in range(tid, Vp, THREADS):
        if j < V:
            p = math.exp(load(logits, (row, j)) - m) * inv
            store(logits, (row, j), (p - (float32(1.0) if j == tgt else float32(0.0))) * dloss)
        else:
            store(logits, (row, j), float32(0.0))
    if tid == 0:
        losses[row] = loss
        cuda.atomic.add(loss_sum, 0, loss * dloss)
        cuda.atomic.max(max_logit, 0, m)


def stream_threads(W: int, U: int) -> int:
    """The stream kernel's block for rows of W words, U groups of four a thread a turn (see STREAM_THREADS)."""
    turns = -(-W // (4 * U * STREAM_THREADS))
    return 32 * -(-W // (4 * U * turns * 32))


def fused_classifier(logits, losses, loss_sum, targets, V, dloss, stream=0, max_logit=None, variant="registers",
                     threads=None):
    """max_logit: a 1-element float32 device buffer raised to the largest logit of these rows
    (None: a scratch buffer, not recorded). variant: the bf16 row kernel's plan, "registers" (one
    row an SM, all of it in registers), "split" (two rows an SM, part of each in shared memory) or
    "stream" (_bf16_stream_kernel: rows read twice, the second time from L2; widths a multiple of 8,
    else "registers"; the training engine's: bench_kernels at 8192 x 50304 0.698 -> 0.610 ms, stop 20); threads:
    its block (a multiple of 32; default stream_threads).
    On an H200 (GPT-2 124M, B=16, the step's four 4096-row chunks, bench/profile_step.py) with
    16-byte loads: registers 2.00 ms, split 2.51; with 4-byte loads split had won (2.64 vs 2.95)."""
    if max_logit is None:  # a scratch maximum, nobody's
        max_logit = koifish_cuda.compat.device_constant((1,), np.float32)
    if variant == "stream" and logits.dtype == np.uint16 and logits.shape[1] % 8 == 0:
        words = logits.view(np.uint32)
        if aligned(words, 4):  # every row start on a 16-byte boundary
            nt = threads or stream_threads(words.shape[1], STREAM_UNROLL)
            _bf16_stream_kernel(nt, STREAM_UNROLL, STREAM_PER_SM)[min(logits.shape[0], STREAM_ROWS), nt, stream](
                words, losses, loss_sum, targets, V, np.float32(dloss), max_logit)
            return
    plan = _bf16_plan(logits.shape[1], "registers" if variant == "stream" else variant) \
        if logits.dtype == np.uint16 else None
    if plan is not None:  # bf16 rows: a row kernel (GPT-2's 50304 columns: 25 words x 1024 threads)
        words = logits.view(np.uint32)
        vec = words.shape[1] % 4 == 0 and aligned(words, 4)  # (aligned: every row start too)
        _bf16_rows_kernel(*plan, vec)[logits.shape[0], plan[2], stream](words, losses, loss_sum, targets, V,
                                                                         np.float32(dloss), max_logit)
        return
    fused_classifier_kernel[logits.shape[0], THREADS, stream](logits, losses, loss_sum, targets, V, np.float32(dloss),
                                                              max_logit)  # float32: a Python float is float64
