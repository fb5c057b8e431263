"""Host-to-device uploads through pinned memory, queued on the stream without waiting for it.

CUDA copies from pageable host memory synchronize the stream first (its API sync rules), so each of
a training step's small uploads (the batch, the step's hyperparameters) would stall the host until
the GPU drained and leave the GPU idle until the host's next launch. Here each destination has a
ring of pinned buffers; a buffer is written again only once the copy that last read it has finished
(its event), so several uploads to one destination (micro-batches) can be queued at once.
"""

from __future__ import annotations

import numpy as np


class Staging:
    def __init__(self, stream, slots: int = 2):
        self.stream, self.slots = stream, slots
        self._rings: dict[tuple, list] = {}

    def upload(self, dst, src) -> None:
        """dst (a CuPy array) = src (anything NumPy casts to dst's shape and dtype), queued on the stream."""
        import cupy as cp
        import cupyx

        key = (id(dst), dst.shape, dst.dtype.str)  # shape and type too: an id can be reused by a later array
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = [0, [[cupyx.empty_pinned(dst.shape, dst.dtype), None] for _ in range(self.slots)]]
        turn, bufs = ring
        buf = bufs[turn]
        ring[0] = (turn + 1) % self.slots
        if buf[1] is not None:
            buf[1].synchronize()  # the copy that last read this buffer
        np.copyto(buf[0], np.reshape(src, dst.shape), casting="unsafe")
        dst.set(buf[0], stream=self.stream)
        buf[1] = cp.cuda.Event(disable_timing=True)
        buf[1].record(self.stream)
