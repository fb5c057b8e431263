"""Linear layer with weights stored (out, in), as llm.c and PyTorch's nn.Linear.

    out = x @ W.T + b        x (N, C), W (OC, C), b (OC,) -> (N, OC)
On the GPU these are cuBLAS GEMMs (see gemm.py); this is the reference the engine is checked against.
"""

import numpy as np


def matmul_forward_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    out = x @ w.T
    if b is not None:
        out += b
    return out


def matmul_backward_ref(dout: np.ndarray, x: np.ndarray, w: np.ndarray):
    """Returns (dx, dw, db) for dout (N, OC)."""
    return dout @ w, dout.T @ x, dout.sum(axis=0)
