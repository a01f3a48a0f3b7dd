"""Memory for the batches a process reads itself (a loader with 0 workers), reused once a batch is gone.

A batch of 256 five-second IMU windows is 6 MB. Allocated afresh for every batch, it lands on memory the kernel has
to fault in and zero (huge pages, for arrays this big) whenever the heap has moved on — as it does while a first epoch
fills the chunk cache —: about a tenth of a first epoch's time. ``BatchMemory`` keeps a few buffers and lends one to
each batch (``arena``); a buffer comes back only when every array carved from it, and every view or tensor of those,
is gone, so nothing a caller keeps can change under it. A caller holding many batches just makes more buffers.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

ALIGN = 64  # bytes: every array starts on a cache line
HEADROOM = 1 << 20  # bytes added to a new buffer, so that a slightly larger batch still fits


class BatchMemory:
    """A pool of reusable buffers. ``arena()`` → an allocator ``(shape, dtype) -> array`` for one batch."""

    def __init__(self, keep: int = 4):
        self.keep = keep  # free buffers kept at most (more are let go)
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()  # buffers come back from whichever thread drops a batch
    def arena(self) -> "PooledArena":
        return PooledArena(self)

    def _take(self, nbytes: int) -> np.ndarray:
        """A free buffer of at least ``nbytes`` (the largest free one when it fits, else a new one)."""
        with self._lock:
            self._free.sort(key=len)
            if self._free and len(self._free[-1]) >= nbytes:
                return self._free.pop()
        return np.empty(nbytes + HEADROOM, dtype=np.uint8)

    def _give_back(self, buf: np.ndarray) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(buf)


class PooledArena:
    """Arrays for one batch inside one buffer of a ``BatchMemory``: the first allocation takes the buffer (sized to
    it); later ones that do not fit get ordinary arrays. The buffer returns to the pool when the arrays are gone."""

    def __init__(self, pool: BatchMemory):
        self.pool, self.base, self.addr, self.end = pool, None, 0, 0

    def __call__(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        n = count * dtype.itemsize
        if self.base is None and n:
            buf = self.pool._take(n + n // 8 + ALIGN)  # room for the batch's smaller arrays (e.g. its mask)
            # the arrays below are views of ``base`` (its own base is a memoryview, not an array), so ``base`` lives
            # exactly as long as any of them: then ``buf`` goes back to the pool
            self.base = np.frombuffer(memoryview(buf), dtype=np.uint8)
            weakref.finalize(self.base, self.pool._give_back, buf)
            self.addr = self.base.ctypes.data
            self.end = -self.addr % ALIGN
        if n == 0 or self.base is None or self.end + n > len(self.base):
            return np.empty(shape, dtype=dtype)
        off, self.end = self.end, -(-(self.addr + self.end + n) // ALIGN) * ALIGN - self.addr
        return self.base[off:off + n].view(dtype).reshape(shape)
