"""The cache key: the components that decide what a window set yields and how the cache lays it out.

A window set describes itself (``Windows.fingerprint_components()``: for a ``WindowSet`` its store, spec, video
backend and index); the cache adds the caller's ``transforms`` identifier, the mmloader and cache versions and the
shard size. The key is 32 hex digits of SHA-256 over the canonical JSON of all of them.
"""

from __future__ import annotations

from typing import Any

from .._version import __version__
from ..windows.protocol import RESERVED_COMPONENTS, Windows, index_digest, sha256_json
from .layout import CACHE_VERSION, DEFAULT_SHARD_SIZE, CacheError

__all__ = ["fingerprint_components", "fingerprint_of", "index_digest", "sha256_json"]


def fingerprint_components(ws: Windows, transforms: str | None = None,
                           shard_size: int = DEFAULT_SHARD_SIZE) -> dict[str, Any]:
    """Everything that decides what ``ws[i]`` yields and how the cache lays it out (JSON-serialisable):
    ``ws.fingerprint_components()``, the caller's ``transforms`` identifier, the mmloader version, the cache
    format version and the shard size."""
    own = ws.fingerprint_components()
    clash = sorted(set(own) & set(RESERVED_COMPONENTS))
    if clash:
        raise CacheError(f"{type(ws).__name__}.fingerprint_components() uses the cache's own keys {clash}")
    return {"cache_version": CACHE_VERSION, "mmloader_version": __version__, **own,
            "transforms": transforms, "shard_size": int(shard_size)}


def fingerprint_of(components: dict[str, Any]) -> str:
    """The cache key: 32 hex digits of SHA-256 over the canonical JSON of ``components``."""
    return sha256_json(components)[:32]
