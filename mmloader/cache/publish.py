"""Making shards visible all at once, advisory fill locks, and cleaning what dead writers left.

- **Local disks**: a shard is written completely (data, then ``COMMIT.json``) under ``tmp/.tmp-K-<host>-<pid>-<rand>``
  and published by one ``rename`` to ``shards/K``. ``cache.json`` is created with an exclusive hard link.
- **Object stores**: no rename; an old ``COMMIT.json`` is removed, the data written, ``COMMIT.json`` written last.
- **Fill locks** (``locks/K.lock``, ``O_EXCL``, recording host and pid; local disks only) avoid duplicate work;
  correctness never depends on them. A lock whose owner is dead (same host) or older than ``LOCK_STALE_S`` is broken.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from typing import Any, Callable

import numpy as np

from ..fsutil import pid_alive
from . import testhooks
from .layout import COMMIT, LOCKS, META, SHARDS, TMP, Place, shard_rel
from .shard import write_group

LOCK_STALE_S = 600.0  # a fill lock older than this is broken (its owner is presumed dead)
LEFTOVER_STALE_S = 3600.0  # a temporary shard of another host older than this is removed


def host_tag() -> str:
    """8 hex digits naming this host in temporary shard names."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


# -- publishing ----------------------------------------------------------------------------------------
def publish_shard(place: Place, k: int, commit: dict[str, Any], arrays: dict[str, np.ndarray],
                  is_complete: Callable[[], bool]) -> None:
    """Make shard ``k`` visible, all at once (see the module docstring). ``is_complete()`` tells whether the copy
    already at ``shards/K`` is valid: then it is kept (same content) and ours dropped; else it is moved aside."""
    data = json.dumps(commit, separators=(",", ":")).encode()
    if not place.local:
        commit_path = place.at(shard_rel(k), COMMIT)
        if place.fs.exists(commit_path):
            place.fs.rm(commit_path)  # from now on readers see a torn shard: a miss
        write_group(place.where(shard_rel(k)), arrays, place.zarr_options())
        testhooks.pause_before_commit(k)
        place.fs.pipe_file(commit_path, data)
        return
    tmpdir = place.at(TMP)
    os.makedirs(place.at(SHARDS), exist_ok=True)
    os.makedirs(tmpdir, exist_ok=True)
    tmp = f"{tmpdir}/.tmp-{k:06d}-{host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write_group(tmp, arrays, None)
        testhooks.pause_before_commit(k)
        with open(f"{tmp}/{COMMIT}", "wb") as f:
            f.write(data)
        _rename_into_place(tmp, place.at(shard_rel(k)), tmpdir, k, is_complete)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        clean_leftovers(place, k)


def _rename_into_place(tmp: str, final: str, tmpdir: str, k: int, is_complete: Callable[[], bool]) -> None:
    for _ in range(4):
        try:
            os.rename(tmp, final)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if is_complete():
            return  # another writer published the same windows first
        trash = f"{tmpdir}/.trash-{k:06d}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(final, trash)
        except FileNotFoundError:
            continue
        shutil.rmtree(trash, ignore_errors=True)
    raise OSError(f"{final}: could not publish shard {k} (replaced concurrently too often)")


def create_meta(place: Place, data: bytes) -> None:
    """Write ``cache.json`` unless it exists: an exclusive hard link on local disks (the loser keeps the winner's
    file and checks it), one PUT of the same content elsewhere."""
    meta_path = place.at(META)
    if not place.local:
        place.fs.pipe_file(meta_path, data)
        return
    os.makedirs(place.path, exist_ok=True)
    tmp = place.at(f".{META}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, meta_path)  # fails if another process created it first; the caller then checks theirs
    except FileExistsError:
        pass
    except OSError:  # no hard links here: an atomic replace is never torn either
        os.replace(tmp, meta_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -- fill locks (local filesystems; advisory) ------------------------------------------------------------
def take_lock(place: Place, k: int) -> str | None:
    """Take shard ``k``'s fill lock: its path ("" where there are no locks), or None if someone holds it."""
    if not place.local:
        return ""
    path = place.at(LOCKS, f"{k:06d}.lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    owner = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}).encode()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not lock_is_stale(path):
                return None
            _unlink(path)
            continue
        with os.fdopen(fd, "wb") as f:
            f.write(owner)
        return path
    return None


def release_lock(lock: str) -> None:
    if lock:
        _unlink(lock)


def lock_is_stale(path: str) -> bool:
    """Whether the lock at ``path`` is older than ``LOCK_STALE_S`` or unreadable, or its owner on this host is gone."""
    try:
        age = time.time() - os.path.getmtime(path)
        with open(path, "rb") as f:
            owner = json.loads(f.read() or b"{}")
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True
    if age > LOCK_STALE_S:
        return True
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        return not pid_alive(owner["pid"])
    return False


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- leftovers of dead writers ---------------------------------------------------------------------------
def leftovers(place: Place) -> list[tuple[str, str, bool]]:
    """``(name, path, stale)`` of the temporary and trash shards on a local disk. A temporary shard is stale when
    its writer (same host) is gone or it is older than ``LEFTOVER_STALE_S``; a trash shard always is."""
    tmpdir = place.at(TMP)
    if not place.local or not os.path.isdir(tmpdir):
        return []
    out = []
    for name in sorted(os.listdir(tmpdir)):
        if not name.startswith((".tmp-", ".trash-")):
            continue
        path = f"{tmpdir}/{name}"
        stale = name.startswith(".trash-")
        if not stale:
            parts = name.split("-")  # .tmp, K, host, pid, rand
            try:
                mine = parts[2] == host_tag()
                stale = (mine and not pid_alive(int(parts[3]))) or time.time() - os.path.getmtime(path) > LEFTOVER_STALE_S
            except (IndexError, ValueError, OSError):
                stale = True
        out.append((name, path, stale))
    return out


def clean_leftovers(place: Place, k: int | None = None) -> None:
    """Remove stale temporary/trash shards (of shard ``k``, or all) and, for all, stale locks."""
    if not place.local:
        return
    for name, path, stale in leftovers(place):
        if stale and (k is None or name.split("-")[1] == f"{k:06d}"):
            shutil.rmtree(path, ignore_errors=True)
    locks = place.at(LOCKS)
    if k is None and os.path.isdir(locks):
        for name in os.listdir(locks):
            if lock_is_stale(f"{locks}/{name}"):
                _unlink(f"{locks}/{name}")
