"""``WindowCache``: what a window set (any ``Windows``) yields, materialised into chunked Zarr on any fsspec URL.

``ws.cache(url="auto", fill="lazy"|"eager")`` returns a ``CachedWindows`` (``mmloader.cache.view``) whose ``[i]`` is
served from here; see ``docs/cache.md``. Contracts:

- **Exact**: a window read from the cache is bit-identical to the uncached read (same keys in the same
  order, same tensor dtypes, shapes and bytes). Every tensor-valued key of the sample is cached, whatever
  its name; the other keys come from the source's ``index_fields`` (``recording_id``, ``t0``, ``t1``, ``index``...).
- **Keyed by a fingerprint** of everything that decides the samples (``fingerprint.fingerprint_components``): a
  changed store, spec, index, decoder backend, transforms or mmloader version gives another key, so another cache.
- **Atomic, checksummed shards** (``shard``, ``publish``): windows ``[k*K, (k+1)*K)`` form shard ``k``; a shard
  without a valid commit, or whose bytes do not match it, is a miss: re-read from the source and rewritten, never
  served.
- **Concurrency**: processes (loader workers, several builders) fill shards independently; an advisory
  per-shard lock file avoids duplicate work, and correctness never depends on it (publishing is atomic
  and every writer writes identical content).
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from typing import Any

from ..fsutil import join, normalize_url
from ..lru import LRU
from ..windows.protocol import Windows
from . import publish
from .files import shared_files
from .fingerprint import fingerprint_components, fingerprint_of
from .layout import CACHE_FORMAT, CACHE_VERSION, DEFAULT_SHARD_SIZE, LOCKS, META, SHARDS, TMP, CacheError, Place
from .layout import read_json, shard_rel
from .manage import cache_root, clear, read_meta, stale_reason
from .shard import (InvalidShard, OpenShard, check_all_rows, clone, decode_window, encode_shard, open_shard,
                    read_batch_rows)

HANDLE_CACHE = 4096  # opened shards kept per process (a commit record and paths each: a few KB)
RECENT_SHARDS = 2  # shards this process read but could not write, kept in memory


class WindowCache:
    """The cache of one window set at one URL.

    ``get(i)`` is ``source[i]``, served from the cache when shard ``i // shard_size`` is committed and its
    checksums match, else read from ``source`` (the whole shard, which is then published). ``fill()``
    builds every missing, torn or corrupt shard. ``status()`` / ``validate()`` inspect. Picklable: only
    the configuration travels; handles reopen in the process that reads.

    ``source`` (any ``mmloader.windows.protocol.Windows``) is None for a cache opened only to inspect or clear it
    (``WindowCache.inspect``).
    """

    def __init__(self, source: Windows | None, url: str, components: dict[str, Any],
                 n_windows: int, storage_options: dict[str, Any] | None = None):
        self.source = source
        self.components = components
        self.fingerprint = fingerprint_of(components)
        self.shard_size = int(components["shard_size"])
        self.n_windows = int(n_windows)
        self.storage_options = dict(storage_options or {})
        self.url = normalize_url(url)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self.place = Place.of(self.url, self.storage_options)
        self.fs, self.path, self.local = self.place.fs, self.place.path, self.place.local
        self._handles: LRU[OpenShard] = LRU(HANDLE_CACHE)
        self._files = shared_files()  # chunk files kept open for batched reads (local caches)
        self._recent: LRU[list[dict[str, Any]]] = LRU(RECENT_SHARDS)
        self._mutex = threading.Lock()
        self._warned = False

    def __getstate__(self) -> dict[str, Any]:
        keep = ("source", "url", "components", "fingerprint", "shard_size", "n_windows", "storage_options")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, source: Windows, url: str = "auto", transforms: str | None = None,
             shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False, **storage_options: Any) -> "WindowCache":
        """The cache of ``source`` at ``url`` (``"auto"``: ``cache_root()/<fingerprint>``), created if absent.

        Raises ``CacheError`` if ``url`` holds the cache of another window set (its recorded fingerprint
        differs) or something that is not a cache, unless ``overwrite=True`` (then it is cleared first).
        ``TypeError`` if ``source`` is not a ``Windows``.
        """
        if not isinstance(source, Windows):
            raise TypeError(f"source must be a window set (len, [i], index_fields, fingerprint_components: "
                            f"mmloader.windows.protocol.Windows), got {type(source).__name__}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        components = fingerprint_components(source, transforms, shard_size)
        if url == "auto":
            url = join(cache_root(), fingerprint_of(components))
        cache = cls(source, url, components, len(source), storage_options)
        cache._ensure_meta(overwrite)
        return cache

    @classmethod
    def inspect(cls, url: str, **storage_options: Any) -> "WindowCache":
        """A cache opened from its ``cache.json`` alone (no source): for ``status``, ``info``, ``clear``."""
        meta = read_meta(url, **storage_options)
        return cls(None, url, meta["components"], meta["n_windows"], storage_options)

    def meta(self) -> dict[str, Any]:
        """The content of ``cache.json``."""
        return {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "fingerprint": self.fingerprint,
            "n_windows": self.n_windows,
            "shard_size": self.shard_size,
            "n_shards": self.n_shards,
            "components": self.components,
        }

    def _ensure_meta(self, overwrite: bool) -> None:
        """Create ``cache.json`` (race-free: an exclusive hard link on local disks, one PUT elsewhere, with
        the same content from every process of the same window set) or check the existing one."""
        where = join(self.url, META)
        meta_path = join(self.path, META)
        for _ in range(3):
            exists = self.fs.exists(meta_path)
            found = read_json(self.fs, meta_path) if exists else None
            if found is not None and found.get("fingerprint") == self.fingerprint:
                return
            if exists:
                if not overwrite:
                    what = (f"another window set (fingerprint {found.get('fingerprint')}, expected {self.fingerprint})"
                            if found is not None else f"an unreadable {META}")
                    raise CacheError(f"{where}: {self.url} holds the cache of {what}; pass overwrite=True, "
                                     f"clear it (mmloader cache clear {self.url}) or use another URL")
                clear(self.url, **self.storage_options)
                overwrite = False
                continue
            if self.fs.exists(self.path):
                foreign = [e for e in self.fs.ls(self.path, detail=False)
                           if not e.rstrip("/").rsplit("/", 1)[-1].startswith(".")
                           and e.rstrip("/").rsplit("/", 1)[-1] not in (META, SHARDS, LOCKS, TMP)]
                if foreign:
                    raise CacheError(f"{self.url}: not empty and not a window cache ({len(foreign)} other entries); "
                                     "choose another URL")
            publish.create_meta(self.place, json.dumps(self.meta(), indent=1).encode())
        raise CacheError(f"{where}: could not create or read the cache's metadata")

    # -- layout ----------------------------------------------------------------------------------
    @property
    def n_shards(self) -> int:
        return -(-self.n_windows // self.shard_size)

    def shard_range(self, k: int) -> tuple[int, int]:
        """Window indices ``[start, stop)`` of shard ``k``."""
        return k * self.shard_size, min((k + 1) * self.shard_size, self.n_windows)

    def _expected_commit(self, k: int) -> dict[str, Any]:
        start, stop = self.shard_range(k)
        return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "fingerprint": self.fingerprint,
                "shard": k, "start": start, "stop": stop}

    def _open_shard(self, k: int) -> OpenShard:
        return open_shard(self.place, k, self._expected_commit(k))

    def _source(self) -> Windows:
        if self.source is None:
            raise CacheError(f"{self.url}: opened for inspection only (no source window set)")
        return self.source

    # -- reading ---------------------------------------------------------------------------------
    def get(self, i: int) -> dict[str, Any]:
        """Window ``i`` (``0 <= i < n_windows``): from the cache, or from the source on a miss.

        A miss takes shard ``i // shard_size``'s fill lock, reads the whole shard from the source and publishes
        it (if that write fails, the shard is kept in memory instead, so it is read from the source once); if
        another process holds the lock, only window ``i`` is read from the source. A torn or corrupt shard is a
        miss (and is rebuilt), never served.
        """
        source = self._source()
        k, j = divmod(i, self.shard_size)
        sample = self._try_read(k, j, i)
        if sample is not None:
            return sample
        with self._mutex:
            recent = self._recent.get(k, lambda: None) if k in self._recent else None
        if recent is not None:
            return clone(recent[j])
        lock = self._lock(k)
        if lock is None:  # another process is filling this shard right now
            return source[i]
        try:
            sample = self._try_read(k, j, i)  # published while we waited for the lock?
            if sample is not None:
                return sample
            samples = self._fill_shard(k)
        finally:
            self._unlock(lock)
        return samples[j]

    def get_batch(self, indices: list[int], alloc: Any = None) -> dict[str, Any] | None:
        """``collate([self.get(i) for i in indices])`` when every window's shard is complete here and its rows read
        cleanly (``read_batch_rows``): the rows go straight into the batch tensors. None otherwise (then the caller
        reads window by window: misses filled, damage rebuilt)."""
        from ..windows.collate import batch_index_fields

        rows = []
        for i in indices:
            k, j = divmod(int(i), self.shard_size)
            shard = self._handle(k)
            if shard is None:
                return None
            rows.append((shard, j))
        keys = rows[0][0].commit["keys"]
        damaged: list[OpenShard] = []
        tensors = read_batch_rows(self.place, rows, keys, alloc, self._files, damaged)
        if tensors is None:  # read window by window (misses filled, damage rebuilt), from freshly opened files
            for shard in damaged:
                self._forget_files(int(shard.commit["shard"]))
            return None
        rest = batch_index_fields(self._source(), indices, [name for name, kind in keys if kind != "tensor"])
        return {name: tensors[name] if kind == "tensor" else rest[name] for name, kind in keys}

    def _try_read(self, k: int, j: int, i: int) -> dict[str, Any] | None:
        """Window ``i`` (row ``j`` of shard ``k``) from the cache, or None if the shard is absent, torn or corrupt."""
        shard = self._handle(k)
        if shard is None:
            return None
        try:
            return decode_window(self.place, shard, j, lambda: self._source().index_fields(i))
        except Exception:  # checksum mismatch, unreadable or vanished chunk: a miss, never served
            with self._mutex:
                self._handles.pop(k)
            self._forget_files(k)
            return None

    def _forget_files(self, k: int) -> None:
        """Close the chunk files of shard ``k`` kept open (it is being replaced, or a read of it failed)."""
        if self.local:
            self._files.forget(self.place.at(shard_rel(k)))

    def _handle(self, k: int) -> OpenShard | None:
        """Shard ``k`` opened (kept open per process), or None if it is absent, torn or unreadable."""
        with self._mutex:
            if k in self._handles:
                return self._handles.get(k, lambda: None)
        try:
            shard = self._open_shard(k)
        except Exception:  # absent, torn, or unreadable metadata (corrupt)
            return None
        with self._mutex:
            return self._handles.get(k, lambda: shard)

    # -- filling ---------------------------------------------------------------------------------
    def _fill_shard(self, k: int, strict: bool = False) -> list[dict[str, Any]]:
        """Read shard ``k``'s windows from the source and publish them; returns the samples.

        A failure to write (disk full, permissions) raises if ``strict`` (eager fill); otherwise it is warned
        about once and the samples are still returned: the cache is an accelerator, not a source of truth.
        """
        source = self._source()
        start, stop = self.shard_range(k)
        announce = getattr(source, "will_read", None)
        if announce is not None:  # shards fill in index order: one run, decoded forward across shard boundaries
            announce(range(start, len(source)))
        samples = [source[x] for x in range(start, stop)]
        commit, arrays = encode_shard(samples, k, start, self.fingerprint, source.index_fields)
        with self._mutex:
            self._handles.pop(k)
        self._forget_files(k)
        try:
            self._publish(k, commit, arrays)
        except OSError as e:
            if strict:
                raise
            if not self._warned:
                warnings.warn(f"mmloader cache {self.url}: could not write shard {k} ({e}); serving from the source",
                              RuntimeWarning, stacklevel=3)
                self._warned = True
            with self._mutex:
                self._recent.pop(k)
                self._recent.get(k, lambda: samples)
            samples = [clone(s) for s in samples]
        return samples

    def _publish(self, k: int, commit: dict[str, Any], arrays: dict[str, Any]) -> None:
        publish.publish_shard(self.place, k, commit, arrays, lambda: self.verify_shard(k)[0] == "complete")

    def _lock(self, k: int) -> str | None:
        """Take shard ``k``'s fill lock: its path ("" where there are no locks), or None if someone holds it."""
        return publish.take_lock(self.place, k)

    @staticmethod
    def _unlock(lock: str) -> None:
        publish.release_lock(lock)

    def fill(self, progress: bool = True, poll_s: float = 0.1, shards: range | None = None) -> dict[str, int]:
        """Build every shard (of ``shards``, default all) that is missing, torn or corrupt (eager fill); returns
        counts (``shards``: how many were looked at).

        Shards being filled by another process (their lock is held) are skipped first and waited for at
        the end (filled here if their lock goes stale). Existing shards are verified (checksums).
        """
        from tqdm.auto import tqdm

        self._source()
        shards = range(self.n_shards) if shards is None else shards
        if shards and (shards.start < 0 or shards.stop > self.n_shards or shards.step != 1):
            raise ValueError(f"{self.url}: shards {shards} is not a contiguous part of range({self.n_shards})")
        counts = {"shards": len(shards), "filled": 0, "already_complete": 0, "filled_by_others": 0}
        pending = []
        for k in tqdm(shards, desc="cache", unit="shard", disable=not progress):
            if self.verify_shard(k)[0] == "complete":
                counts["already_complete"] += 1
            elif not self._fill_if_unlocked(k, counts):
                pending.append(k)
        for k in pending:
            while not self._fill_if_unlocked(k, counts):
                time.sleep(poll_s)
        publish.clean_leftovers(self.place)
        return counts

    def _fill_if_unlocked(self, k: int, counts: dict[str, int]) -> bool:
        """Fill shard ``k`` under its lock unless it is complete (counted as filled by others); False if the lock
        is held by someone else."""
        lock = self._lock(k)
        if lock is None:
            return False
        try:
            if self.verify_shard(k)[0] != "complete":
                self._fill_shard(k, strict=True)
                counts["filled"] += 1
            else:
                counts["filled_by_others"] += 1
        finally:
            self._unlock(lock)
        return True

    # -- inspection ------------------------------------------------------------------------------
    def verify_shard(self, k: int, deep: bool = True) -> tuple[str, str]:
        """``(state, detail)`` of shard ``k``: ``complete``, ``missing``, ``torn`` (data without a commit) or
        ``corrupt`` (bad commit, or, with ``deep``, a chunk whose checksum does not match)."""
        where = join(self.url, shard_rel(k))
        try:
            shard = self._open_shard(k)
        except FileNotFoundError:
            return "missing", ""
        except InvalidShard as e:
            return e.state, str(e)
        except Exception as e:
            return "corrupt", f"{where}: unreadable ({e})"
        if not deep:
            return "complete", ""
        try:
            check_all_rows(shard)
        except Exception as e:
            return "corrupt", f"{where}: {e}"
        return "complete", ""

    def status(self, verify: bool = True) -> dict[str, Any]:
        """Shards complete / total, and which are missing, torn or corrupt (``verify``: check every checksum).

        A shard is ``torn`` when its data exists without a commit, or when a dead writer left a temporary copy
        of it (local disks); ``leftovers`` lists those temporary copies.
        """
        out: dict[str, Any] = {"url": self.url, "fingerprint": self.fingerprint, "n_windows": self.n_windows,
                               "shard_size": self.shard_size, "shards_total": self.n_shards,
                               "complete": [], "missing": [], "torn": [], "corrupt": [], "problems": []}
        for k in range(self.n_shards):
            state, detail = self.verify_shard(k, deep=verify)
            out[state].append(k)
            if detail:
                out["problems"].append(detail)
        leftovers = publish.leftovers(self.place)
        out["leftovers"] = [name for name, _, _ in leftovers]
        for name, path, stale in leftovers:
            k = int(name.split("-")[1])
            if name.startswith(".tmp-") and stale and k not in out["complete"] and k not in out["torn"]:
                out["torn"].append(k)
                out["problems"].append(f"{path}: shard {k} left half-written by a writer that is gone")
        out["torn"].sort()
        out["shards_complete"] = len(out["complete"])
        out["bytes"] = self.size()
        return out

    def validate(self) -> list[str]:
        """Problems (torn or corrupt shards) found by a full check; empty when every present shard is intact."""
        return self.status(verify=True)["problems"]

    def size(self) -> int:
        """Bytes under the cache URL."""
        try:
            return int(self.fs.du(self.path, total=True))
        except (FileNotFoundError, OSError):
            return 0

    def stale_reason(self) -> str | None:
        """Why the store this cache was built from has changed since (None if it has not, as far as the
        store's manifest and this mmloader's version tell; the index is checked when a window set opens it)."""
        return stale_reason(self.components)

    def __repr__(self) -> str:
        return f"WindowCache({self.url!r}, fingerprint={self.fingerprint}, {self.n_shards} shards of {self.shard_size})"
