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

import numpy as np

from .shm import ALIGN, Arena

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
        """A free buffer of at least ``nbytes`` (the largest free one when it fits, else a new one), starting on a
        cache line."""
        with self._lock:
            self._free.sort(key=len)
            if self._free and len(self._free[-1]) >= nbytes:
                return self._free.pop()
        raw = np.empty(nbytes + HEADROOM + ALIGN, dtype=np.uint8)
        start = -raw.ctypes.data % ALIGN
        return raw[start:start + nbytes + HEADROOM]

    def _give_back(self, buf: np.ndarray) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(buf)


class PooledArena(Arena):
    """Arrays for one batch inside one buffer of a ``BatchMemory``: the first allocation takes the buffer (sized to
    it); later ones that do not fit get ordinary arrays. The buffer returns to the pool when the arrays are gone."""

    def __init__(self, pool: BatchMemory):
        super().__init__()
        self.pool, self.base = pool, None

    def _memory(self, nbytes: int) -> np.ndarray:
        if self.base is None:
            buf = self.pool._take(nbytes + nbytes // 8)  # room for the batch's smaller arrays (e.g. its mask)
            # the arrays carved are views of ``base`` (its own base is a memoryview, not an array), so ``base`` lives
            # exactly as long as any of them: then ``buf`` goes back to the pool
            self.base = np.frombuffer(memoryview(buf), dtype=np.uint8)
            weakref.finalize(self.base, self.pool._give_back, buf)
        return self.base
