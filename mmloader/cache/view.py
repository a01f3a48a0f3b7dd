"""``CachedWindows``: any ``Windows`` read through a ``WindowCache``; what ``ws.cache(...)`` returns.

It serves bit-identical samples (``len``, ``[i]``, iteration, ``.loader(...)``) and is itself a ``Windows``, so the
loader and the plugin use it like the set it wraps. ``spec``, ``index``, ``modalities``, ``store``, ``report()`` and
the selections (``split``, ``recordings``, ``filter``) are the source set's: a selection is an uncached set (its
index, so its fingerprint, differs); cache the selection instead. ``cache(...)`` again caches the source anew.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from ..windows.protocol import Windows, WrappedWindows, position
from .layout import DEFAULT_SHARD_SIZE
from .window_cache import WindowCache


def cache_windows(source: Windows, url: str = "auto", fill: str = "lazy", progress: bool = True, *,
                  transforms: str | None = None, shard_size: int | None = None, overwrite: bool = False,
                  **storage_options: Any) -> "CachedWindows":
    """``source`` read through the window cache at ``url`` (see ``WindowSet.cache``, which calls this). A cached
    view as ``source`` stands for the set it wraps. ``fill="eager"`` builds every missing shard now."""
    if fill not in ("lazy", "eager"):
        raise ValueError(f"fill must be 'lazy' or 'eager', got {fill!r}")
    if isinstance(source, CachedWindows):
        source = source.source
    cache = WindowCache.open(source, url, transforms=transforms, overwrite=overwrite,
                             shard_size=shard_size or DEFAULT_SHARD_SIZE, **storage_options)
    if fill == "eager":
        cache.fill(progress=progress)
    return CachedWindows(cache)


class CachedWindows(WrappedWindows):
    """A window set served from ``window_cache`` (a ``WindowCache``), its source read only on a miss."""

    def __init__(self, window_cache: WindowCache):
        if window_cache.source is None:
            raise ValueError(f"{window_cache.url}: a cache opened for inspection has no source to serve")
        self.window_cache = window_cache

    @property
    def source(self) -> Windows:
        """The set this view caches (read on a miss)."""
        return self.window_cache.source

    # -- the Windows protocol --------------------------------------------------------------------
    def __len__(self) -> int:
        return self.window_cache.n_windows

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.window_cache.get(position(i, len(self)))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def read_batch(self, indices: Sequence[int], alloc: Any = None) -> dict[str, Any] | None:
        """``collate([self[i] for i in indices])`` read straight from complete shards (``WindowCache.get_batch``;
        ``alloc(shape, dtype)``: where to put the batch arrays); None when a window is not cached yet or a row does
        not read cleanly (the loader then reads window by window, filling and repairing)."""
        if len(indices) == 0:
            return None
        return self.window_cache.get_batch([position(int(i), len(self)) for i in indices], alloc=alloc)

    def affinity(self, indices: Sequence[int]) -> np.ndarray:
        """Where windows ``indices`` are read from: their shard (int64). A loader with workers splits each shuffled
        batch by it, so that every shard is opened by one worker only (``mmloader.shared_batch``)."""
        return np.asarray(indices, dtype=np.int64) // int(self.window_cache.shard_size)

    def index_fields(self, i: int) -> dict[str, Any]:
        return self.source.index_fields(i)

    def index_fields_batch(self, indices: Any) -> dict[str, Any]:
        """``collate`` of ``index_fields`` over ``indices`` (column by column when the source can)."""
        from ..windows.collate import batch_index_fields

        return batch_index_fields(self.source, indices)

    def fingerprint_components(self) -> dict[str, Any]:
        return self.source.fingerprint_components()

    @property
    def run_alignment(self) -> int:
        """Windows per shard: a loader reading in index order with workers gives each worker whole shards."""
        return int(self.window_cache.shard_size)

    # -- fluent ----------------------------------------------------------------------------------
    def cache(self, url: str = "auto", fill: str = "lazy", progress: bool = True, *, transforms: str | None = None,
              shard_size: int | None = None, overwrite: bool = False, **storage_options: Any) -> "CachedWindows":
        """The source set cached again (at another URL, or with other options); see ``WindowSet.cache``."""
        return cache_windows(self.source, url, fill, progress, transforms=transforms, shard_size=shard_size,
                             overwrite=overwrite, **storage_options)

    def loader(self, batch_size: int = 32, shuffle: bool | str = False, seed: int = 0, num_workers: int = 0,
               **kw: Any):
        """A ``mmloader.loader.WindowLoader`` over this cached set (the arguments of ``WindowSet.loader``)."""
        from ..windows.dataset import WindowSet

        # WindowSet.loader is the loader's front door (the one place the windows layer may import it) and only
        # needs ``len`` and ``[i]`` of the set it is given
        return WindowSet.loader(self, batch_size=batch_size, shuffle=shuffle, seed=seed, num_workers=num_workers, **kw)

    def __repr__(self) -> str:
        return f"CachedWindows({self.source!r}, cache={self.window_cache.url!r})"
