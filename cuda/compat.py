"""numpy/numba compatibility, applied once before any kernel compiles.

numba-cuda 0.30.4 registers an overload for np.row_stack when its array module loads, and
numpy 2.5 removed np.row_stack (it was an alias of np.vstack), so every kernel compile fails
with AttributeError there. Restoring the alias is exactly what numpy used to provide.
"""

import numpy as np


def apply() -> None:
    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack


apply()
