"""A window cache's on-disk layout (names, format id, defaults) and ``CacheError``.

::

    <url>/cache.json            format, version, fingerprint and its components, n_windows, shard_size
    <url>/shards/000000/        shard k = windows [k*K, (k+1)*K): a Zarr v3 group, one array per tensor key,
                                plus COMMIT.json (written last)
    <url>/locks/000003.lock     advisory fill locks (local disks only)
    <url>/tmp/.tmp-000003-...   shards being written, .trash-* shards thrown away (local disks only)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import MMLoaderError
from ..fsutil import get_fs, is_local, join, normalize_url

CACHE_FORMAT = "mmloader-window-cache"
CACHE_VERSION = 1
META = "cache.json"
SHARDS = "shards"
LOCKS = "locks"
TMP = "tmp"  # shards being written (``.tmp-*``) or thrown away (``.trash-*``); same filesystem as ``shards``
COMMIT = "COMMIT.json"
DEFAULT_SHARD_SIZE = 32


class CacheError(MMLoaderError):
    """A window cache cannot be used: another window set's cache at the URL, or a sample it cannot hold."""


def shard_rel(k: int) -> str:
    """Shard ``k``'s folder, relative to the cache URL."""
    return f"{SHARDS}/{k:06d}"


def read_json(fs: Any, path: str) -> dict[str, Any] | None:
    """The JSON object at ``path`` on ``fs``; None if absent, unreadable or not an object."""
    try:
        with fs.open(path, "rb") as f:
            out = json.loads(f.read())
        return out if isinstance(out, dict) else None
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None


@dataclass
class Place:
    """Where a cache lives: its URL (for messages and remote Zarr), its fsspec filesystem and path there, and
    whether that is a local disk (atomic ``rename``, lock files) or an object store."""

    url: str
    fs: Any
    path: str
    local: bool
    storage_options: dict[str, Any]

    @classmethod
    def of(cls, url: str, storage_options: dict[str, Any] | None = None) -> "Place":
        options = dict(storage_options or {})
        fs, path = get_fs(url, **options)
        return cls(normalize_url(url), fs, path, is_local(fs), options)

    def at(self, *rel: str) -> str:
        """A path on ``fs`` inside the cache."""
        return join(self.path, *rel)

    def where(self, *rel: str) -> str:
        """A URL inside the cache (for messages)."""
        return join(self.url, *rel)

    def zarr_url(self, rel: str) -> str:
        return join(self.path if self.local else self.url, rel)

    def zarr_options(self) -> dict[str, Any] | None:
        return None if self.local else self.storage_options
