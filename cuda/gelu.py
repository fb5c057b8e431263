"""GELU, tanh approximation (GPT-2's "gelu_new").

    y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
"""

import numpy as np

GELU_SCALE = float(np.sqrt(2.0 / np.pi))


def gelu_forward_ref(x: np.ndarray) -> np.ndarray:
    x2 = x * x  # x*x*x rather than x**3: numpy's float power is several times slower
    return 0.5 * x * (1.0 + np.tanh(GELU_SCALE * x * (1.0 + 0.044715 * x2)))


def gelu_backward_ref(x: np.ndarray, dout: np.ndarray) -> np.ndarray:
    x2 = x * x
    t = np.tanh(GELU_SCALE * x * (1.0 + 0.044715 * x2))
    dtanh = GELU_SCALE * (1.0 + 3 * 0.044715 * x2)
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dtanh)
