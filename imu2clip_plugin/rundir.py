"""The run folder of a training run: a local path or an fsspec URL (``s3://bucket/runs/x``), written by rank 0
and read by every rank on resume, so it must be one folder that every node sees (a shared filesystem or object
storage); stores and caches need not be.

Writes are whole-file and atomic either way: locally a temporary file renamed into place (durable, see
:func:`imu2clip_plugin.distributed.atomic_write`); on object storage one PUT per file (an object is replaced whole,
never seen half-written). ``metrics.jsonl`` is appended line by line locally; on a URL (no appends) it is kept in
memory and rewritten whole at every :meth:`MetricsLog.flush` (each checkpoint, validation and the end of a run).
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from pathlib import Path
from typing import Any

from mmloader.fsutil import get_fs

from .distributed import atomic_write

__all__ = ["is_url", "read_url", "write_url", "move_url", "exists_url", "remove_url", "RunDir", "MetricsLog"]


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a remote fsspec location (``s3://``, ``gs://``, ``memory://``...), not a local file."""
    s = os.fspath(path)
    return "://" in s and not s.startswith("file://")


def read_url(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The whole object; FileNotFoundError when it does not exist."""
    fs, p = get_fs(url, **(storage_options or {}))
    fs.invalidate_cache(p)
    return fs.cat_file(p)


def write_url(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Replace the object with ``data`` in one put (visible whole or not at all)."""
    fs, p = get_fs(url, **(storage_options or {}))
    fs.pipe_file(p, data)


def move_url(src: str, dst: str, storage_options: dict[str, Any] | None = None) -> None:
    """Move one object onto another (a server-side copy, then the source is removed)."""
    fs, s = get_fs(src, **(storage_options or {}))
    d = get_fs(dst, **(storage_options or {}))[1]
    fs.mv(s, d)


def exists_url(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, p = get_fs(url, **(storage_options or {}))
    fs.invalidate_cache(p)
    return fs.exists(p)


def remove_url(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Remove one object (or a folder of them); nothing when it does not exist."""
    fs, p = get_fs(url, **(storage_options or {}))
    fs.invalidate_cache(p)
    if fs.exists(p):
        fs.rm(p, recursive=True)


class RunDir:
    """A run folder: ``location`` is a ``Path`` (local) or the URL string; :meth:`file` names a file in it the same
    way (what messages print). ``storage_options`` configure a URL's filesystem (an S3 endpoint, say; keys are
    better left to the environment, since the trainer's config, which holds these options, is written into the
    run folder)."""

    def __init__(self, location: str | os.PathLike, storage_options: dict[str, Any] | None = None):
        self.remote = is_url(location)
        self.storage_options = dict(storage_options or {})
        local = os.fspath(location)
        local = local[len("file://"):] if local.startswith("file://") else local
        self.location: Path | str = os.fspath(location).rstrip("/") if self.remote else Path(local)

    def __str__(self) -> str:
        return str(self.location)

    def file(self, name: str) -> Path | str:
        return posixpath.join(self.location, name) if self.remote else self.location / name

    def exists(self, name: str) -> bool:
        return exists_url(self.file(name), self.storage_options) if self.remote else self.file(name).exists()

    def read_bytes(self, name: str) -> bytes:
        """The file's bytes; FileNotFoundError when it does not exist."""
        return read_url(self.file(name), self.storage_options) if self.remote else self.file(name).read_bytes()

    def write(self, name: str, data: bytes) -> None:
        """Replace the file atomically (see the module docstring)."""
        if self.remote:
            write_url(self.file(name), data, self.storage_options)
        else:
            atomic_write(self.file(name), data)

    def remove(self, name: str) -> None:
        """Remove a file or folder of the run; nothing when it is not there."""
        if self.remote:
            remove_url(self.file(name), self.storage_options)
            return
        p = self.file(name)
        if p.is_dir():
            import shutil

            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    def makedirs(self) -> None:
        if self.remote:
            fs, p = get_fs(str(self.location), **self.storage_options)
            fs.makedirs(p, exist_ok=True)
        else:
            self.location.mkdir(parents=True, exist_ok=True)

    def upload(self, local_dir: str | os.PathLike, name: str, order: list[str] | None = None) -> str:
        """Copy the files of ``local_dir`` into the run folder's ``name``/ (remote runs), in ``order`` first (the
        file a reader checks last goes last); returns its location."""
        files = sorted(p.name for p in Path(local_dir).iterdir() if p.is_file())
        first = [f for f in (order or []) if f in files]
        for f in first + [f for f in files if f not in first]:
            write_url(posixpath.join(self.file(name), f), (Path(local_dir) / f).read_bytes(), self.storage_options)
        return str(self.file(name))


class MetricsLog:
    """``metrics.jsonl`` of a run (written by rank 0 only: ``enabled``). Locally each record is appended as it
    comes; on a URL the records are kept in memory and the object is rewritten at :meth:`flush` (and at most every
    ``flush_every_s`` seconds while appending)."""

    def __init__(self, run: RunDir, name: str, enabled: bool, flush_every_s: float = 60.0):
        self.run, self.name, self.enabled, self.flush_every_s = run, name, enabled, flush_every_s
        self._lines: list[str] = []
        self._flushed = time.monotonic()

    def start(self, step: int | None) -> None:
        """Keep the records of the steps up to ``step`` (None: none, a fresh run), atomically: a resumed run logs
        each step once. The interrupted run's ``end`` record and lines torn by a crash are dropped too."""
        if not self.enabled:
            return
        try:
            old = self.run.read_bytes(self.name).decode(errors="replace")
        except FileNotFoundError:
            old = None
        keep = []
        for line in (old or "").splitlines() if step is not None else []:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            st = rec.get("step", 0) if isinstance(rec, dict) else None
            if isinstance(st, (int, float)) and st <= step and rec.get("event") != "end":
                keep.append(line + "\n")
        if self.run.remote:
            self._lines = keep
            self.flush()
        elif old is not None:
            self.run.write(self.name, "".join(keep).encode())

    def append(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(rec) + "\n"
        if not self.run.remote:
            with open(self.run.file(self.name), "a") as f:
                f.write(line)
            return
        self._lines.append(line)
        if time.monotonic() - self._flushed >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Write what is in memory (URL runs; local records are already written)."""
        if self.enabled and self.run.remote:
            self.run.write(self.name, "".join(self._lines).encode())
            self._flushed = time.monotonic()
