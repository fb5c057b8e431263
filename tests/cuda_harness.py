"""Run kernel tests on the GPU when there is one, else under Numba's CUDA simulator."""

import os

import numpy as np

try:
    import cupy as cp

    ON_GPU = cp.cuda.runtime.getDeviceCount() > 0 and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1"
except Exception:  # noqa: BLE001  (no CuPy, no driver, no device: all mean "simulate")
    ON_GPU = False


def dev(a: np.ndarray):
    return cp.asarray(a) if ON_GPU else np.array(a)


def host(a) -> np.ndarray:
    return cp.asnumpy(a) if ON_GPU else np.asarray(a)


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(got).all(), "non-finite output: an element was not written or overflowed"
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
