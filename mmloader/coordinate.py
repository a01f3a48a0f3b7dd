"""Preparing a store once when several processes open it at the same time (torchrun, SLURM, two shells).

``prepare_once(dst, ready, prepare, what=...)`` is what ``mmloader.open`` runs before it opens a store that it
prepares itself (``open(name, root=...)``, ``open("sample:ego4d")``). The contract:

- ``ready()`` true: nothing is done (the common case: one cheap existence check, no lock, no wait).
- **A local folder** (or any path of this machine's filesystem, shared over NFS or not): one process at a time holds
  an exclusive lock (``flock``) on a lock file beside ``dst`` (``.NAME.lock``, or ``lock=`` given), prepares while
  holding it, and removes the lock file when done; every other process waits for the lock, finds ``ready()`` true
  and prepares nothing. So exactly one process writes each folder, whether the ranks share a disk or not: when each
  node (or each rank) has its own folder, one process per folder prepares that folder's copy. The first to try is
  the launcher's rank 0; other ranks first wait ``grace_s`` for the store or rank 0's lock to appear (so rank 0
  prepares a shared folder), then take the lock themselves (their folder is not shared: one process per folder
  prepares it). Where ``flock`` does not exclude processes on other nodes (NFS mounted ``nolock``), prepare first.
  A lock whose holder died is released by the kernel, never left stale.
- **A URL** (``s3://...``: every rank sees the same store, and objects cannot be locked): rank 0 (of
  ``mmloader.dist.launch_rank_world``) prepares; the other ranks poll ``ready()``.
- Every wait is bounded by ``timeout_s`` (``$MMLOADER_PREPARE_TIMEOUT_S``, default 3 h) and ends in
  :class:`PrepareTimeoutError` naming the folder, the lock file and its holder (rank, pid, host).

The publish itself is the store writer's (``mmloader.store.writer``: written under a temporary name, renamed into
place with its manifest last), so ``ready()`` (the manifest exists) never sees half a store. No collective
(``torch.distributed``) is used: ``open`` may be called on one rank only, and waits are bounded here, not by a
process group's timeout.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from typing import Callable

from .dist import launch_rank_world
from .errors import MMLoaderError
from .fsutil import get_fs, is_local

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX system: no locks (rank 0 prepares, the others wait)
    fcntl = None

__all__ = ["prepare_once", "PrepareTimeoutError", "lock_path", "TIMEOUT_ENV", "GRACE_ENV"]

TIMEOUT_ENV = "MMLOADER_PREPARE_TIMEOUT_S"   # seconds a process waits for another's preparation
GRACE_ENV = "MMLOADER_PREPARE_GRACE_S"       # seconds a rank other than 0 lets rank 0 go first
DEFAULT_TIMEOUT_S = 3 * 3600.0
DEFAULT_GRACE_S = 10.0
POLL_S = 0.2
# flock on a filesystem without locks (some FUSE or Lustre mounts without -o flock)
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}

log = logging.getLogger("mmloader.prepare")


class PrepareTimeoutError(MMLoaderError, TimeoutError):
    """Waiting for another process to prepare a store took longer than the timeout."""


def lock_path(dst: str) -> str:
    """The lock file of a local destination: ``.NAME.lock`` beside it."""
    parent, name = os.path.split(os.path.normpath(dst))
    return os.path.join(parent, f".{name}.lock")


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"environment variable {env}={raw!r}: expected a number of seconds") from None
    if not value >= 0:
        raise ValueError(f"environment variable {env}={raw!r}: expected a number of seconds >= 0")
    return value


def _place() -> tuple[int, int, bool]:
    """``(rank, world_size, first)``: ``first`` for a process that tries the lock at once (one process alone, or
    rank 0). Every other process first waits a grace period for rank 0's lock or the store, so that a folder shared
    by several nodes is prepared by rank 0 and not by each node's first process."""
    rank, world = launch_rank_world()
    return rank, world, world == 1 or rank == 0


def _me(rank: int, world: int) -> str:
    who = f"pid {os.getpid()} on {socket.gethostname()}"
    return f"rank {rank} of {world} ({who})" if world > 1 else who


class _FolderLock:
    """An exclusive ``flock`` on a lock file that its holder removes on release (a waiter that locked the removed
    file notices, by its inode, and tries again). The file holds the holder's rank, pid and host, for messages."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None

    def try_acquire(self, holder: dict) -> bool:
        """Take the lock now if it is free; False when another process holds it. OSError: no locks here."""
        for _ in range(3):   # the file may be removed by its holder between our open and our flock
            if fcntl is None:
                raise OSError(errno.ENOSYS, "flock is not available on this platform")
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(holder).encode(), 0)
                return True
            os.close(fd)   # locked a file its holder had just removed: try the new one
        return False

    def held_by_other(self) -> bool:
        """Whether another process holds the lock now (without creating the file)."""
        if fcntl is None:
            raise OSError(errno.ENOSYS, "flock is not available on this platform")
        try:   # read-write: where flock is emulated with POSIX locks (NFS), an exclusive lock needs it
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)   # closing releases a lock taken here

    def holder(self) -> str:
        """Who holds (or last held) the lock, from the file's content."""
        try:
            with open(self.path) as f:
                h = json.loads(f.read() or "{}")
            return f"rank {h['rank']} of {h['world_size']} (pid {h['pid']} on {h['host']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def _say(progress: bool, msg: str) -> None:
    log.info(msg)
    if progress:
        print(f"mmloader: {msg}", file=sys.stderr, flush=True)


def _wait_ready(ready: Callable[[], bool], deadline: float, dst: str, what: str, why: str) -> None:
    while not ready():
        if time.monotonic() >= deadline:
            raise PrepareTimeoutError(
                f"{dst}: {what} is still not there after waiting {why}; set {TIMEOUT_ENV} to wait longer, or "
                f"prepare it beforehand (e.g. `mmloader prepare`) and open the prepared store")
        time.sleep(POLL_S)


def _run(prepare: Callable[[], object], dst: str, what: str, me: str, progress: bool) -> None:
    _say(progress, f"{me} prepares {what} into {dst}")
    t0 = time.monotonic()
    prepare()
    _say(progress, f"{me} prepared {what} in {time.monotonic() - t0:.1f} s")


def prepare_once(dst: str, ready: Callable[[], bool], prepare: Callable[[], object], *, what: str,
                 lock: str | None = None, progress: bool = True, timeout_s: float | None = None,
                 grace_s: float | None = None) -> bool:
    """Make ``ready()`` true by running ``prepare()`` in exactly one process per destination folder (see the
    module docstring); returns True in the process that prepared, False elsewhere (and when already ready).

    ``dst``: the folder or URL ``prepare`` publishes (its messages name it). ``lock``: the lock file (default
    ``.NAME.lock`` beside a local ``dst``). ``timeout_s`` (default ``$MMLOADER_PREPARE_TIMEOUT_S`` or 3 h) bounds
    every wait; ``grace_s`` (``$MMLOADER_PREPARE_GRACE_S`` or 10 s) is how long a rank other than rank 0 waits for
    rank 0's lock file or the store before preparing its own copy. ``progress``: a line on stderr when this process
    prepares or waits. Raises :class:`PrepareTimeoutError` naming ``dst`` when a wait runs out; what ``prepare``
    raises propagates (the lock is released first, so a waiting process tries in its turn)."""
    if ready():
        return False
    timeout = _seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S) if timeout_s is None else float(timeout_s)
    grace = _seconds(GRACE_ENV, DEFAULT_GRACE_S) if grace_s is None else float(grace_s)
    rank, world, first = _place()
    me = _me(rank, world)
    fs, path = get_fs(dst)
    if not is_local(fs) and lock is None:
        return _prepare_shared(dst, ready, prepare, what, rank, me, progress, timeout)
    folder = _FolderLock(lock or lock_path(path))
    os.makedirs(os.path.dirname(folder.path) or ".", exist_ok=True)
    try:
        return _prepare_locked(folder, dst, ready, prepare, what, (rank, world, first, me), progress, timeout, grace)
    except OSError as e:
        if e.errno not in _NO_LOCKS:
            raise
        log.warning("%s: cannot lock %s (%s): rank 0 prepares, the other ranks wait", dst, folder.path, e)
        return _prepare_shared(dst, ready, prepare, what, rank, me, progress, timeout)


def _prepare_shared(dst: str, ready, prepare, what: str, rank: int, me: str, progress: bool, timeout: float) -> bool:
    """Without a lock: rank 0 prepares, the other ranks wait for ``ready()``."""
    if rank == 0:
        _run(prepare, dst, what, me, progress)
        return True
    _say(progress, f"{me} waits for rank 0 to prepare {what} into {dst}")
    _wait_ready(ready, time.monotonic() + timeout, dst, what, f"{timeout:g} s for rank 0 to prepare it")
    return False


def _prepare_locked(folder: _FolderLock, dst: str, ready, prepare, what: str, place: tuple, progress: bool,
                    timeout: float, grace: float) -> bool:
    rank, world, first, me = place
    if not first:   # let rank 0 start: it may share this folder
        end = time.monotonic() + grace
        while time.monotonic() < end and not folder.held_by_other():
            if ready():
                return False
            time.sleep(POLL_S)
    holder = {"rank": rank, "world_size": world, "pid": os.getpid(), "host": socket.gethostname(),
              "since": time.time(), "what": what}
    deadline, told = time.monotonic() + timeout, False
    while not folder.try_acquire(holder):
        if ready():
            return False
        if not told:
            _say(progress, f"{me} waits for {folder.holder()} to prepare {what} into {dst}")
            told = True
        if time.monotonic() >= deadline:
            raise PrepareTimeoutError(
                f"{dst}: waited {timeout:g} s for {folder.holder()} to prepare {what} (lock {folder.path}); set "
                f"{TIMEOUT_ENV} to wait longer, or prepare it beforehand (e.g. `mmloader prepare`)")
        time.sleep(POLL_S)
    try:
        if ready():   # prepared by the process that held the lock before us
            return False
        _run(prepare, dst, what, me, progress)
        return True
    finally:
        folder.release()
