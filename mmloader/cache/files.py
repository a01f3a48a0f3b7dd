"""Chunk files kept open per process, so that a shuffled epoch over a local cache does not open one per read.

A full shuffle visits each shard's chunk files once per window it holds, in random order: an ``open`` and a
``close`` per window and key cost about as much as the read. ``shared_files()`` is the process's ``OpenFiles``,
shared by every cache it reads: up to ``capacity`` read-only descriptors, least recently used closed first
(``default_capacity()``: half the process's open-file limit, at most 16,384, or ``MMLOADER_CACHE_OPEN_FILES``; 0
turns it off; raise ``ulimit -n`` for caches of many shards). Reads are positional (``pread``), so descriptors are
shared safely by a forked child. A descriptor outlives a shard replaced on disk (it reads the old file): callers
``forget`` a shard's files when a read of it fails its checks, and every row is checked against its CRC-32 anyway.
"""

from __future__ import annotations

import errno
import os
import resource
import threading
from typing import Iterator

from ..lru import LRU

OPEN_FILES_ENV = "MMLOADER_CACHE_OPEN_FILES"
MAX_OPEN_FILES = 16384


def default_capacity() -> int:
    """``MMLOADER_CACHE_OPEN_FILES`` when set, else half of ``RLIMIT_NOFILE``'s soft limit (per process), at most
    16,384."""
    env = os.environ.get(OPEN_FILES_ENV)
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            raise ValueError(f"{OPEN_FILES_ENV}={env!r}: expected a whole number of files") from None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 2 * MAX_OPEN_FILES
    return max(0, min(MAX_OPEN_FILES, soft // 2))


class OpenFiles:
    """Read-only descriptors by path, at most ``capacity`` open. ``lock`` must be held while a descriptor from
    ``fd`` is used (another thread could otherwise close it, and its number be reused)."""

    def __init__(self, capacity: int | None = None):
        self.capacity = default_capacity() if capacity is None else max(0, int(capacity))
        self.lock = threading.RLock()
        self._fds: LRU[int] = LRU(max(1, self.capacity), on_evict=lambda _, fd: os.close(fd))

    def fd(self, path: str) -> tuple[int, bool]:
        """``(descriptor, kept)`` of ``path`` opened read-only; ``kept`` False: the caller closes it (no capacity).
        Raises OSError (FileNotFoundError...) as ``os.open`` does."""
        if self.capacity == 0:
            return os.open(path, os.O_RDONLY), False
        return self._fds.get(path, lambda: self._open(path)), True

    def _open(self, path: str) -> int:
        """``os.open``; when the process is out of descriptors, the older half of those kept are closed (and the
        capacity halved) first, then it tries once more."""
        try:
            return os.open(path, os.O_RDONLY)
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE) or len(self._fds) == 0:
                raise
        keep = len(self._fds) // 2
        self._drop(list(self._fds)[: len(self._fds) - keep])  # least recently used first
        self.capacity = max(1, keep)
        self._fds.capacity = self.capacity
        return os.open(path, os.O_RDONLY)

    def forget(self, prefix: str) -> None:
        """Close the kept descriptors of the paths under folder ``prefix`` (a shard replaced or found damaged)."""
        folder = prefix.rstrip("/") + "/"
        with self.lock:
            self._drop([p for p in self._paths() if p.startswith(folder)])

    def close(self) -> None:
        """Close every kept descriptor."""
        with self.lock:
            self._drop(list(self._paths()))

    def _drop(self, paths: list[str]) -> None:
        """Forget and close the kept descriptors of ``paths``."""
        for path in paths:
            fd = self._fds.pop(path)
            if fd is not None:
                os.close(fd)

    def __len__(self) -> int:
        return len(self._fds)

    def _paths(self) -> Iterator[str]:
        return iter(self._fds)  # type: ignore[arg-type]  (LRU iterates over a copy of its keys)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may be gone
            pass


_SHARED: list[OpenFiles] = []


def shared_files() -> OpenFiles:
    """The process's ``OpenFiles`` (one for every cache it reads, so that together they stay under the limit)."""
    if not _SHARED:
        _SHARED.append(OpenFiles())
    return _SHARED[0]


def _after_fork_in_child() -> None:
    """A child forked while another thread held the lock must not inherit it held: a fresh lock (the descriptors
    stay valid in the child, and reads are positional)."""
    for files in _SHARED:
        files.lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)
