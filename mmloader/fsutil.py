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


# -- network failures: one line naming the URL -----------------------------------------------------------
PROBE_CONNECT_TIMEOUT_S = 5  # the first request to an S3 store: connect timeout, when the caller set none
PROBE_MAX_ATTEMPTS = 1  # ... and attempts (botocore's default is 5 with backoff: ~15 s on a closed port)


def is_network_error(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it wraps) says the storage could not be reached: connection refused or
    reset, unknown host, connect/read timeout (builtin, botocore, aiohttp and requests errors)."""
    import socket

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError, socket.gaierror, socket.herror)):
            return True
        for cls in type(e).__mro__:
            mod = cls.__module__ or ""
            if (mod.startswith("botocore") and cls.__name__ in ("ConnectionError", "HTTPClientError")) or (
                    mod.startswith("aiohttp") and cls.__name__ in ("ClientConnectionError", "ServerTimeoutError")) or (
                    mod.startswith("requests") and cls.__name__ in ("ConnectionError", "Timeout")) or (
                    mod.startswith("fsspec") and cls.__name__ == "FSTimeoutError"):
                return True
        e = e.__cause__ or e.__context__
    return False


def unreachable_error(url: str, e: BaseException) -> Exception:
    """A ``StoreUnreachableError`` for ``url`` from the network error ``e`` (its first line kept)."""
    from .errors import StoreUnreachableError

    detail = (str(e).strip().splitlines() or [""])[0][:300]
    return StoreUnreachableError(f"{url}: cannot reach the storage ({type(e).__name__}: {detail})")


def _fast_fail_fs(fs: fsspec.AbstractFileSystem, storage_options: dict[str, Any]) -> fsspec.AbstractFileSystem:
    """For S3: the same filesystem with one attempt and a short connect timeout, unless the caller configured
    retries or timeouts (their ``config_kwargs`` are never overridden). Other filesystems: ``fs`` itself."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if not {"s3", "s3a"} & set(protocols):
        return fs
    import copy

    opts = copy.deepcopy(dict(storage_options))
    config = dict(opts.get("config_kwargs") or {})
    if {"retries", "connect_timeout"} & set(config) or "connect_timeout" in opts:
        return fs
    config["retries"] = {"max_attempts": PROBE_MAX_ATTEMPTS}
    config["connect_timeout"] = PROBE_CONNECT_TIMEOUT_S
    opts["config_kwargs"] = config
    opts.pop("skip_instance_cache", None)
    try:
        return type(fs)(skip_instance_cache=True, **opts)
    except Exception:  # an option this filesystem class does not take: probe with the caller's own
        return fs


def probe_exists(fs: fsspec.AbstractFileSystem, path: str, url: str, storage_options: dict[str, Any] | None = None
                 ) -> bool:
    """``fs.exists(path)`` as the first request to a store: an unreachable endpoint fails fast (one attempt,
    5 s connect timeout on S3 unless configured) with ``StoreUnreachableError`` naming ``url``."""
    try:
        return _fast_fail_fs(fs, storage_options or {}).exists(path)
    except Exception as e:
        if is_network_error(e):
            raise unreachable_error(url, e) from None
        raise


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` on this host may still be running (the owner of a lock or a partial folder).
    Unsure answers (pid <= 0, another user's process, any other OS error) are "alive": never break a live owner's work."""
    if pid <= 0:
        return True  # 0 and negative pids name process groups, not an owner
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError included: alive, another user's
        return True
    return True


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
    """Parse a JSON file on any fsspec URL; invalid JSON, or a key repeated in one object (which ``json`` would
    silently resolve to its last copy), raises SourceFormatError naming the file."""
    import json

    from .errors import SourceFormatError

    def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:  # json.load would keep the last copy without a word
                raise SourceFormatError(path, f"key {key!r} appears twice in one JSON object")
            obj[key] = value
        return obj

    fs, p = get_fs(path)
    try:
        with fs.open(p, "r") as f:
            return json.load(f, object_pairs_hook=no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise SourceFormatError(path, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
