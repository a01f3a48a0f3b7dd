"""The window cache: what a window set serves, stored once in checksummed Zarr shards, served bit-identically.

See ``docs/cache.md``. ``WindowCache`` wraps any window set (``len``, ``[i]``); ``list_caches``, ``clear`` and
``clear_all`` manage the caches under ``cache_root()``.
"""

from .window_cache import (CACHE_FORMAT, CACHE_VERSION, DEFAULT_SHARD_SIZE, PAUSE_ENV, CacheError, WindowCache,
                           cache_root, clear, clear_all, fingerprint_components, fingerprint_of, index_digest,
                           list_caches)

__all__ = ["CACHE_FORMAT", "CACHE_VERSION", "DEFAULT_SHARD_SIZE", "PAUSE_ENV", "CacheError", "WindowCache",
           "cache_root", "clear", "clear_all", "fingerprint_components", "fingerprint_of", "index_digest",
           "list_caches"]
