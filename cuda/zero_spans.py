"""Zero a flat array's listed spans in one launch.

The CUDA engine's first micro-batch of a step writes each weight matrix's gradient with a beta = 0
GEMM, so only the rest of the flat gradient (biases, LayerNorm parameters, the position embedding,
ZeRO-1's padding: ~1% of GPT-2's) needs zeroing first. One fill of the whole array read as nothing
and wrote 0.5 GB at 124M (0.12 ms on an H200); a fill per small tensor would add ~100 graph nodes.
The spans are cut into pieces of at most PIECE elements, a block a piece.
"""

from __future__ import annotations

import numpy as np

PIECE = 4096  # elements a block zeroes: 16 a thread of 256


def zero_spans_ref(x: np.ndarray, spans) -> None:
    """x[start:stop] = 0 for each (start, stop) in spans."""
    for start, stop in spans:
        x[start:stop] = 0


def span_pieces(spans, piece: int = PIECE) -> np.ndarray:
    """(n, 2) int64 [start, stop) rows covering spans, each at most `piece` long (empty spans dropped)."""
    rows = [(lo, min(lo + piece, stop)) for start, stop in spans for lo in range(start, stop, piece)]
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


# ---- CUDA ------------------------------------------------------------------------------------
import koifish_cuda.compat  # noqa: E402,F401  (before numba compiles)
from numba import cuda  # noqa: E402

THREADS = 256


@cuda.jit(cache=True)
def zero_spans_kernel(x, pieces):
    """Block b zeroes x[pieces[b, 0]:pieces[b, 1]], consecutive threads on consecutive elements."""
    b = cuda.blockIdx.x
    for i in range(pieces[b, 0] + cuda.threadIdx.x, pieces[b, 1], cuda.blockDim.x):
        x[i] = 0


def zero_spans(x, pieces, stream=0) -> None:
    """x (flat, device) zeroed over `pieces` (span_pieces' rows, on the device)."""
    if pieces.shape[0]:
        zero_spans_kernel[pieces.shape[0], THREADS, stream](x, pieces)
