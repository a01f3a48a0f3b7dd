"""Finding, inspecting and deleting caches: ``cache_root``, ``list_caches``, ``read_meta``, ``stale_reason``,
``clear``, ``clear_all``."""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Any

from .._version import __version__
from ..fsutil import get_fs, is_local, join, normalize_url
from ..paths import cache_dir
from .fingerprint import fingerprint_of, sha256_json
from .files import shared_files
from .layout import CACHE_FORMAT, CACHE_VERSION, META, CacheError, read_json


def cache_root() -> str:
    """Where ``url="auto"`` caches live: ``mmloader.paths.cache_dir() / "windows"``."""
    return str(cache_dir() / "windows")


def read_meta(url: str, **storage_options: Any) -> dict[str, Any]:
    """The ``cache.json`` of the cache at ``url``, checked (format; fingerprint matching its components); else
    ``CacheError``."""
    fs, path = get_fs(url, **storage_options)
    meta = read_json(fs, join(path, META))
    if meta is None or meta.get("format") != CACHE_FORMAT:
        raise CacheError(f"{normalize_url(url)}: not an mmloader window cache (no valid {META})")
    if fingerprint_of(meta["components"]) != meta["fingerprint"]:
        raise CacheError(f"{join(normalize_url(url), META)}: fingerprint {meta['fingerprint']} does not match "
                         "its components")
    return meta


def stale_reason(components: dict[str, Any]) -> str | None:
    """Why a cache with these fingerprint components no longer matches its store (None if it does, as far as the
    store's manifest and this mmloader's version tell; a set without a store is checked by version alone)."""
    from ..errors import StoreFormatError
    from ..store import Store

    c = components
    if c.get("cache_version") != CACHE_VERSION or c.get("mmloader_version") != __version__:
        return f"built by mmloader {c.get('mmloader_version')} (cache v{c.get('cache_version')})"
    if "store_url" not in c:
        return None
    try:
        store = Store(c["store_url"])
    except StoreFormatError as e:
        return f"store unreadable or gone ({e})"
    m = store.manifest
    if m.get("format_version") != c["store_format_version"]:
        return f"store format v{m.get('format_version')}, cache built from v{c['store_format_version']}"
    if m.get("source_fingerprint") != c["store_source_fingerprint"]:
        return "store re-prepared from another source"
    if sha256_json(m) != c["store_manifest_sha256"]:
        return "store re-prepared (manifest changed)"
    return None


def list_caches(root: str | None = None) -> list[str]:
    """URLs of the caches directly under ``root`` (default ``cache_root()``)."""
    root = normalize_url(root or cache_root())
    fs, path = get_fs(root)
    if not fs.exists(path):
        return []
    out = []
    for entry in sorted(fs.ls(path, detail=False)):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith(".") and fs.exists(join(entry, META)):
            out.append(join(root, name))
    return out


def clear(url: str, force: bool = False, **storage_options: Any) -> bool:
    """Delete the cache at ``url``; False if there was nothing. Refuses (``CacheError``) to delete a folder
    without ``cache.json`` unless ``force``. Local caches are first renamed away, so readers see all or nothing."""
    url = normalize_url(url)
    fs, path = get_fs(url, **storage_options)
    if not fs.exists(path):
        return False
    if not force and not fs.exists(join(path, META)):
        raise CacheError(f"{url}: not an mmloader window cache (no {META}); refusing to delete it")
    if is_local(fs):
        shared_files().forget(path)  # this process's kept chunk files of it: closed, their space freed
        parent, name = os.path.split(path.rstrip("/"))
        trash = os.path.join(parent, f".{name}.deleting-{uuid.uuid4().hex[:8]}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        fs.rm(path, recursive=True)
    return True


def clear_all(root: str | None = None, stale_only: bool = False) -> list[str]:
    """Delete every cache under ``root`` (default ``cache_root()``), or only the stale ones (an unreadable
    ``cache.json`` counts as stale); returns their URLs."""
    gone = []
    for url in list_caches(root):
        if stale_only:
            try:
                if stale_reason(read_meta(url)["components"]) is None:
                    continue
            except CacheError:
                pass
        if clear(url):
            gone.append(url)
    return gone
