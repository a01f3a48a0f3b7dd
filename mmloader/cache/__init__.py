"""The window cache: what a window set serves, stored once in checksummed Zarr shards, served bit-identically.

See ``docs/cache.md``. ``ws.cache(...)`` (or ``cache_windows(ws, ...)``) returns a ``CachedWindows`` view of any
``mmloader.windows.protocol.Windows``; ``WindowCache`` is the cache itself; ``list_caches``, ``clear`` and
``clear_all`` manage the caches under ``cache_root()``.

Modules: ``layout`` (names, ``CacheError``), ``fingerprint`` (the cache key), ``shard`` (encode, decode, verify a
shard), ``publish`` (atomic publish, fill locks, leftovers), ``window_cache`` (``WindowCache``), ``view``
(``CachedWindows``), ``manage`` (listing, staleness, clearing), ``testhooks`` (``PAUSE_ENV``).
"""

from .fingerprint import fingerprint_components, fingerprint_of, index_digest
from .layout import CACHE_FORMAT, CACHE_VERSION, DEFAULT_SHARD_SIZE, CacheError
from .manage import cache_root, clear, clear_all, list_caches
from .testhooks import PAUSE_ENV
from .view import CachedWindows, cache_windows
from .window_cache import WindowCache

__all__ = ["CACHE_FORMAT", "CACHE_VERSION", "DEFAULT_SHARD_SIZE", "PAUSE_ENV", "CacheError", "CachedWindows",
           "WindowCache", "cache_root", "cache_windows", "clear", "clear_all", "fingerprint_components",
           "fingerprint_of", "index_digest", "list_caches"]
