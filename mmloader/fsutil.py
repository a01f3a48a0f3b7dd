"""fsspec helpers: one place that turns paths and URLs into (filesystem, path) pairs."""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def normalize_url(url: str | os.PathLike) -> str:
    """A path or URL as a string; local paths become absolute, with ``~`` expanded."""
    url = os.fspath(url)
    if "://" in url and not url.startswith("file://"):
        return url.rstrip("/")
    if url.startswith("file://"):
        url = url[len("file://"):]
    return os.path.abspath(os.path.expanduser(url))


def get_fs(url: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of ``url`` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(normalize_url(url), **storage_options)
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(url: str, *parts: str) -> str:
    """Join URL parts with ``/`` (also for local paths)."""
    out = url.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def read_arrow_buffer(url_or_path: str, fs: fsspec.AbstractFileSystem | None = None) -> "pa.Buffer":
    """The whole file as an Arrow-owned buffer.

    Arrow readers given Python file objects or ``bytes`` keep Python references inside Arrow's own
    threads; releasing those after the interpreter began to shut down aborts the process
    ("terminate called without an active exception", apache/arrow#34314). An Arrow-owned copy needs
    no Python to be freed.
    """
    import numpy as np
    import pyarrow as pa

    if fs is None:
        fs, url_or_path = get_fs(url_or_path)
    with fs.open(url_or_path, "rb") as f:
        raw = f.read()
    buf = pa.allocate_buffer(len(raw))
    np.frombuffer(buf, dtype=np.uint8)[:] = np.frombuffer(raw, dtype=np.uint8)
    return buf


def read_json(path: str) -> Any:
    """Parse a JSON file on any fsspec URL; invalid JSON raises SourceFormatError with line and column."""
    import json

    from .errors import SourceFormatError

    fs, p = get_fs(path)
    try:
        with fs.open(p, "r") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SourceFormatError(path, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
