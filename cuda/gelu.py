"""GELU, tanh approximation (GPT-2's "gelu_new").

    y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
"""

import numpy as np

GELU_SCALE = float(np.sqrt(2.0 / np.pi))


def gelu_forward_ref(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(GELU_SCALE * (x + 0.044715 * x**3)))


def gelu_backward_ref(x: np.ndarray, dout: np.ndarray) -> np.ndarray:
    t = np.tanh(GELU_SCALE * (x + 0.044715 * x**3))
    dtanh = GELU_SCALE * (1.0 + 3 * 0.044715 * x * x)
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dtanh)
