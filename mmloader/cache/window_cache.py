"""The window cache: what a ``WindowSet`` yields, materialised into chunked Zarr on any fsspec URL.

``wins.cache(url="auto", fill="lazy"|"eager")`` returns a ``WindowSet`` whose ``[i]`` is served from here;
see ``docs/cache.md``. Contracts:

- **Exact**: a window read from the cache is bit-identical to the uncached read (same keys in the same
  order, same tensor dtypes, shapes and bytes). Every tensor-valued key of the sample is cached, whatever
  its name; the other keys (``recording_id``, ``t0``, ``t1``, ``index``, ``text``) come from the index.
- **Keyed by a fingerprint** of everything that decides the samples (``fingerprint_components``): a changed
  store, spec, index, decoder backend, transforms or mmloader version gives another key, so another cache.
- **Atomic, checksummed shards**: windows ``[k*K, (k+1)*K)`` form shard ``k``, a small Zarr group (one
  array per tensor key, one chunk per window) plus ``COMMIT.json`` holding a CRC-32 per window and key.
  On a local filesystem a shard is written under a temporary name and published by one ``rename``; on an
  object store the data is written first and ``COMMIT.json`` last. A shard without a valid commit, or
  whose bytes do not match it, is a miss: re-read from the source and rewritten, never served.
- **Concurrency**: processes (loader workers, several builders) fill shards independently; an advisory
  per-shard lock file avoids duplicate work, and correctness never depends on it (publishing is atomic
  and every writer writes identical content).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
import warnings
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zarr

from .._version import __version__
from ..errors import MMLoaderError
from ..fsutil import get_fs, is_local, join, normalize_url
from ..paths import cache_dir

if TYPE_CHECKING:
    import torch

    from ..windows.dataset import WindowSet

NS = 1_000_000_000
CACHE_FORMAT = "mmloader-window-cache"
CACHE_VERSION = 1
META = "cache.json"
SHARDS = "shards"
LOCKS = "locks"
TMP = "tmp"  # shards being written (``.tmp-*``) or thrown away (``.trash-*``); same filesystem as ``shards``
COMMIT = "COMMIT.json"
DEFAULT_SHARD_SIZE = 32
HANDLE_CACHE = 16  # opened shards kept per process
RECENT_SHARDS = 2  # shards this process read but could not write, kept in memory
LOCK_STALE_S = 600.0  # a fill lock older than this is broken (its owner is presumed dead)
LEFTOVER_STALE_S = 3600.0  # a temporary shard of another host older than this is removed
PAUSE_ENV = "MMLOADER_CACHE_PAUSE_BEFORE_COMMIT"  # test hook: "K" or "K:SECONDS"
_ARRAY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class CacheError(MMLoaderError):
    """A window cache cannot be used: another window set's cache at the URL, or a sample it cannot hold."""


# -- fingerprint ---------------------------------------------------------------------------------------
def cache_root() -> str:
    """Where ``url="auto"`` caches live: ``mmloader.paths.cache_dir() / "windows"``."""
    return str(cache_dir() / "windows")


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def index_digest(index: pa.Table) -> str:
    """SHA-256 of a window index's contents (column names, types, values, row order)."""
    h = hashlib.sha256(f"rows={index.num_rows}".encode())
    for name in index.column_names:
        col = index[name].combine_chunks()
        h.update(f"\0{name}:{col.type}:{col.null_count}\0".encode())
        numeric = pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
        if numeric and col.null_count == 0:
            h.update(col.to_numpy().tobytes())
        elif pa.types.is_list(col.type) and col.null_count == 0 and pa.types.is_integer(col.type.value_type):
            h.update(pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
            h.update(pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
        else:
            h.update(json.dumps(col.to_pylist(), separators=(",", ":"), default=str).encode())
    return h.hexdigest()


def fingerprint_components(ws: "WindowSet", transforms: str | None = None,
                           shard_size: int = DEFAULT_SHARD_SIZE) -> dict[str, Any]:
    """Everything that decides what ``ws[i]`` yields and how the cache lays it out (JSON-serialisable).

    The store (URL, format version, ``source_fingerprint``, and a hash of its whole manifest, so a store
    re-prepared with other options is another store), the window spec, the resolved video backend, a hash
    of the window index, the caller's ``transforms`` identifier, the mmloader version and the shard size.
    """
    manifest = ws.store.manifest
    return {
        "cache_version": CACHE_VERSION,
        "mmloader_version": __version__,
        "store_url": ws.store.url,
        "store_format_version": manifest.get("format_version"),
        "store_source_fingerprint": manifest.get("source_fingerprint"),
        "store_manifest_sha256": _sha256_json(manifest),
        "spec": _canonical_spec(ws.spec),
        "video_backend": ws.video_backend,
        "index_sha256": index_digest(ws.index),
        "transforms": transforms,
        "shard_size": int(shard_size),
    }


def _canonical_spec(spec: Any) -> dict[str, Any]:
    """``spec.to_dict()`` as JSON values, numbers of float fields as floats (``sec=1`` and ``sec=1.0`` cut
    the same windows, so they must give the same fingerprint)."""
    out = json.loads(json.dumps(spec.to_dict()))
    for f in dataclasses.fields(spec):
        v = out.get(f.name)
        if "float" in str(f.type) and isinstance(v, int) and not isinstance(v, bool):
            out[f.name] = float(v)
    return out


def fingerprint_of(components: dict[str, Any]) -> str:
    """The cache key: 32 hex digits of SHA-256 over the canonical JSON of ``components``."""
    return _sha256_json(components)[:32]


# -- small helpers -------------------------------------------------------------------------------------
def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _to_numpy(t: "torch.Tensor") -> np.ndarray:
    """A CPU tensor's data as a C-contiguous numpy array (dtypes numpy lacks, e.g. bfloat16, as same-size ints)."""
    import torch

    t = t.detach().cpu()
    try:
        return np.ascontiguousarray(t.numpy())
    except TypeError:
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        return np.ascontiguousarray(t.contiguous().view(ints[t.element_size()]).numpy())


def _to_torch(a: np.ndarray, dtype: str) -> "torch.Tensor":
    import torch

    t = torch.from_numpy(a)
    want = getattr(torch, dtype.removeprefix("torch."))
    return t if t.dtype == want else t.view(want)


def _clone(sample: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sample.items()}


def _pause_hook(k: int) -> None:
    """Test hook: with ``MMLOADER_CACHE_PAUSE_BEFORE_COMMIT=K[:SECONDS]`` the writer of shard K (``*``: of
    every shard) says so on stderr and sleeps (default an hour) after writing the shard's data, before
    committing it (to be killed there)."""
    value = os.environ.get(PAUSE_ENV)
    if not value:
        return
    shard, _, secs = value.partition(":")
    if shard == "*" or int(shard) == k:
        print(f"mmloader cache: paused before committing shard {k} (pid {os.getpid()})", file=sys.stderr, flush=True)
        time.sleep(float(secs) if secs else 3600.0)


@dataclass
class _Shard:
    """An opened, committed shard: its commit record, its Zarr arrays (one per tensor key) and, per key whose
    chunks are stored raw (the ``bytes`` codec alone, as this module writes them), ``(path of the array,
    dtype, row shape)`` for reading a window's chunk file directly."""

    commit: dict[str, Any]
    arrays: dict[str, Any]
    raw: dict[str, tuple[str, np.dtype, tuple[int, ...]]]


class _Invalid(Exception):
    """A shard that must not be served; ``state`` is ``torn`` or ``corrupt``."""

    def __init__(self, state: str, why: str):
        super().__init__(why)
        self.state = state


# -- the cache -----------------------------------------------------------------------------------------
class WindowCache:
    """The cache of one window set at one URL.

    ``get(i)`` is ``source[i]``, served from the cache when shard ``i // shard_size`` is committed and its
    checksums match, else read from ``source`` (the whole shard, which is then published). ``fill()``
    builds every missing, torn or corrupt shard. ``status()`` / ``validate()`` inspect. Picklable: only
    the configuration travels; handles reopen in the process that reads.

    ``source`` is None for a cache opened only to inspect or clear it (``WindowCache.inspect``).
    """

    def __init__(self, source: "WindowSet | None", url: str, components: dict[str, Any],
                 n_windows: int, storage_options: dict[str, Any] | None = None):
        self.source = source
        self.url = normalize_url(url)
        self.components = components
        self.fingerprint = fingerprint_of(components)
        self.shard_size = int(components["shard_size"])
        self.n_windows = int(n_windows)
        self.storage_options = dict(storage_options or {})
        self._init_runtime()

    def _init_runtime(self) -> None:
        self.fs, self.path = get_fs(self.url, **self.storage_options)
        self.local = is_local(self.fs)
        self._handles: OrderedDict[int, _Shard] = OrderedDict()
        self._recent: OrderedDict[int, list[dict[str, Any]]] = OrderedDict()
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
    def open(cls, source: "WindowSet", url: str = "auto", transforms: str | None = None,
             shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False, **storage_options: Any) -> "WindowCache":
        """The cache of ``source`` at ``url`` (``"auto"``: ``cache_root()/<fingerprint>``), created if absent.

        Raises ``CacheError`` if ``url`` holds the cache of another window set (its recorded fingerprint
        differs) or something that is not a cache, unless ``overwrite=True`` (then it is cleared first).
        """
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
        fs, path = get_fs(url, **storage_options)
        meta = _read_json(fs, join(path, META))
        if meta is None or meta.get("format") != CACHE_FORMAT:
            raise CacheError(f"{normalize_url(url)}: not an mmloader window cache (no valid {META})")
        cache = cls(None, url, meta["components"], meta["n_windows"], storage_options)
        if cache.fingerprint != meta["fingerprint"]:
            raise CacheError(f"{join(cache.url, META)}: fingerprint {meta['fingerprint']} does not match its components")
        return cache

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
            found = _read_json(self.fs, meta_path) if exists else None
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
            self._create_meta(json.dumps(self.meta(), indent=1).encode())
        raise CacheError(f"{where}: could not create or read the cache's metadata")

    def _create_meta(self, data: bytes) -> None:
        meta_path = join(self.path, META)
        if not self.local:
            self.fs.pipe_file(meta_path, data)
            return
        os.makedirs(self.path, exist_ok=True)
        tmp = join(self.path, f".{META}.{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, meta_path)  # fails if another process created it first; the caller then checks theirs
        except FileExistsError:
            pass
        except OSError:  # no hard links here: an atomic replace is never torn either
            os.replace(tmp, meta_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # -- layout ----------------------------------------------------------------------------------
    @property
    def n_shards(self) -> int:
        return -(-self.n_windows // self.shard_size)

    def shard_range(self, k: int) -> tuple[int, int]:
        """Window indices ``[start, stop)`` of shard ``k``."""
        return k * self.shard_size, min((k + 1) * self.shard_size, self.n_windows)

    def _shard_rel(self, k: int) -> str:
        return f"{SHARDS}/{k:06d}"

    def _zarr_url(self, rel: str) -> str:
        return join(self.path if self.local else self.url, rel)

    def _zarr_options(self) -> dict[str, Any] | None:
        return None if self.local else (self.storage_options or {})

    # -- reading ---------------------------------------------------------------------------------
    def get(self, i: int) -> dict[str, Any]:
        """Window ``i`` (``0 <= i < n_windows``): from the cache, or from the source on a miss.

        A miss takes shard ``i // shard_size``'s fill lock, reads the whole shard from the source and publishes
        it (if that write fails, the shard is kept in memory instead, so it is read from the source once); if
        another process holds the lock, only window ``i`` is read from the source. A torn or corrupt shard is a
        miss (and is rebuilt), never served.
        """
        if self.source is None:
            raise CacheError(f"{self.url}: opened for inspection only (no source window set)")
        k, j = divmod(i, self.shard_size)
        sample = self._try_read(k, j, i)
        if sample is not None:
            return sample
        with self._mutex:
            recent = self._recent.get(k)
        if recent is not None:
            return _clone(recent[j])
        lock = self._lock(k)
        if lock is None:  # another process is filling this shard right now
            return self.source[i]
        try:
            sample = self._try_read(k, j, i)  # published while we waited for the lock?
            if sample is not None:
                return sample
            samples = self._fill_shard(k)
        finally:
            self._unlock(lock)
        return samples[j]

    def _try_read(self, k: int, j: int, i: int) -> dict[str, Any] | None:
        """Window ``i`` (row ``j`` of shard ``k``) from the cache, or None if the shard is absent, torn or corrupt."""
        shard = self._handle(k)
        if shard is None:
            return None
        try:
            return self._read_window(shard, j, i)
        except Exception:  # checksum mismatch, unreadable or vanished chunk: a miss, never served
            with self._mutex:
                self._handles.pop(k, None)
            return None

    def _handle(self, k: int) -> _Shard | None:
        with self._mutex:
            shard = self._handles.get(k)
            if shard is not None:
                self._handles.move_to_end(k)
                return shard
        try:
            shard = self._open_shard(k)
        except (_Invalid, FileNotFoundError):
            return None
        except Exception:  # unreadable metadata counts as corrupt
            return None
        with self._mutex:
            self._handles[k] = shard
            while len(self._handles) > HANDLE_CACHE:
                self._handles.popitem(last=False)
        return shard

    def _read_commit(self, k: int) -> dict[str, Any]:
        """Shard ``k``'s commit record, checked against this cache. Raises FileNotFoundError (absent),
        ``_Invalid("torn")`` (data without a commit) or ``_Invalid("corrupt")``."""
        rel = self._shard_rel(k)
        path = join(self.path, rel, COMMIT)
        try:
            with self.fs.open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            if self.fs.exists(join(self.path, rel)):
                raise _Invalid("torn", f"{join(self.url, rel)}: data without {COMMIT}") from None
            raise
        try:
            commit = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise _Invalid("corrupt", f"{join(self.url, rel, COMMIT)}: not valid JSON") from None
        start, stop = self.shard_range(k)
        expected = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "fingerprint": self.fingerprint,
                    "shard": k, "start": start, "stop": stop}
        for key, want in expected.items():
            if commit.get(key) != want:
                raise _Invalid("corrupt", f"{join(self.url, rel, COMMIT)}: {key} is {commit.get(key)!r}, expected {want!r}")
        return commit

    def _open_shard(self, k: int) -> _Shard:
        commit = self._read_commit(k)
        rel = self._shard_rel(k)
        group = zarr.open_group(self._zarr_url(rel), mode="r", storage_options=self._zarr_options())
        arrays = {name: group[t["array"]] for name, t in commit["tensors"].items()}
        raw = {}
        for name, arr in arrays.items():
            endian = getattr(arr.serializer, "endian", "missing")
            endian = endian.value if hasattr(endian, "value") else endian
            if (arr.filters == () and arr.compressors == () and type(arr.serializer).__name__ == "BytesCodec"
                    and endian in (None, "little") and arr.chunks == (1, *arr.shape[1:]) and 0 not in arr.shape):
                dtype = np.dtype(arr.dtype)
                raw[name] = (join(self.path, rel, commit["tensors"][name]["array"]),
                             dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype, tuple(arr.shape[1:]))
        return _Shard(commit, arrays, raw)

    def _read_row(self, shard: _Shard, name: str, j: int) -> np.ndarray:
        """Row ``j`` of a tensor key: its chunk file read straight into memory when stored raw (one small read,
        no event loop: a Zarr v3 chunk with only the ``bytes`` codec is the row's little-endian C-order bytes),
        else through Zarr. A chunk of the wrong length raises."""
        raw = shard.raw.get(name)
        if raw is None:
            return np.asarray(shard.arrays[name][j])
        base, dtype, shape = raw
        arr = shard.arrays[name]
        path = join(base, arr.metadata.encode_chunk_key((j,) + (0,) * len(shape)))
        out = np.empty(shape, dtype=dtype)
        if self.local:
            with open(path, "rb", buffering=0) as f:
                n = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
                if n != out.nbytes or f.read(1):
                    raise ValueError(f"{path}: {n}+ bytes, expected {out.nbytes}")
        else:
            data = self.fs.cat_file(path)
            if len(data) != out.nbytes:
                raise ValueError(f"{path}: {len(data)} bytes, expected {out.nbytes}")
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)
        return out if dtype.isnative else out.astype(dtype.newbyteorder("="))

    def _read_window(self, shard: _Shard, j: int, i: int) -> dict[str, Any]:
        """Row ``j`` of an opened shard as a sample; raises ``_Invalid("corrupt")`` on a checksum mismatch."""
        out: dict[str, Any] = {}
        fields = None
        for name, kind in shard.commit["keys"]:
            if kind == "tensor":
                t = shard.commit["tensors"][name]
                a = self._read_row(shard, name, j)
                shape = tuple(t["shapes"][j])
                if a.shape != shape:
                    a = np.ascontiguousarray(a[tuple(slice(0, s) for s in shape)])
                if zlib.crc32(a) != t["crc32"][j]:
                    raise _Invalid("corrupt", f"{join(self.url, self._shard_rel(shard.commit['shard']))}: "
                                              f"checksum mismatch in {name!r}, row {j}")
                out[name] = _to_torch(a, t["dtype"])
            else:
                fields = fields if fields is not None else self._index_fields(i)
                out[name] = fields[name]
        return out

    def _index_fields(self, i: int) -> dict[str, Any]:
        """The sample's non-tensor values, from the index (as ``WindowSet.__getitem__`` builds them)."""
        c = self.source._columns
        fields = {"recording_id": c.recording_id[i], "t0": int(c.t0[i]) / NS, "t1": int(c.t1[i]) / NS, "index": i}
        if c.text is not None:
            fields["text"] = c.text[i]
        if c.label is not None:
            fields["label"] = c.label[i]
        return fields

    # -- filling ---------------------------------------------------------------------------------
    def _fill_shard(self, k: int, strict: bool = False) -> list[dict[str, Any]]:
        """Read shard ``k``'s windows from the source and publish them; returns the samples.

        A failure to write (disk full, permissions) raises if ``strict`` (eager fill); otherwise it is warned
        about once and the samples are still returned: the cache is an accelerator, not a source of truth.
        """
        start, stop = self.shard_range(k)
        samples = [self.source[x] for x in range(start, stop)]
        commit, arrays = self._encode(k, samples)
        with self._mutex:
            self._handles.pop(k, None)
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
                self._recent[k] = samples
                while len(self._recent) > RECENT_SHARDS:
                    self._recent.popitem(last=False)
            samples = [_clone(s) for s in samples]
        return samples

    def _encode(self, k: int, samples: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The commit record and the arrays (one per tensor key, windows stacked, zero-padded if shapes vary)."""
        import torch

        start, stop = self.shard_range(k)
        first = samples[0]
        keys = [[name, "tensor" if isinstance(v, torch.Tensor) else "index"] for name, v in first.items()]
        for x, s in zip(range(start, stop), samples):
            if [[n, "tensor" if isinstance(v, torch.Tensor) else "index"] for n, v in s.items()] != keys:
                raise CacheError(f"window {x} has keys {list(s)}, window {start} has {list(first)}: cannot cache")
            fields = self._index_fields(x)
            for name, kind in keys:
                if kind == "index" and (name not in fields or fields[name] != s[name]):
                    raise CacheError(f"sample key {name!r} is neither a tensor nor rebuilt from the index; "
                                     "the window cache cannot hold it")
        tensors: dict[str, Any] = {}
        arrays: dict[str, np.ndarray] = {}
        for n, (name, kind) in enumerate(keys):
            if kind != "tensor":
                continue
            values = [_to_numpy(s[name]) for s in samples]
            dtypes = {str(s[name].dtype) for s in samples}
            if len(dtypes) > 1 or len({v.ndim for v in values}) > 1:
                raise CacheError(f"{name!r}: dtype or number of dimensions varies between windows {start}..{stop - 1}")
            shapes = [list(v.shape) for v in values]
            full = tuple(max(s[d] for s in shapes) for d in range(values[0].ndim))
            if all(tuple(s) == full for s in shapes):
                stacked = np.stack(values)
            else:
                stacked = np.zeros((len(values), *full), dtype=values[0].dtype)
                for row, v in enumerate(values):
                    stacked[(row, *(slice(0, s) for s in v.shape))] = v
            array = name if _ARRAY_NAME.fullmatch(name) else f"key{n}"
            arrays[array] = stacked
            tensors[name] = {"array": array, "dtype": dtypes.pop(), "shapes": shapes,
                             "crc32": [zlib.crc32(v) for v in values]}
        commit = {
            "format": CACHE_FORMAT, "version": CACHE_VERSION, "fingerprint": self.fingerprint,
            "shard": k, "start": start, "stop": stop, "keys": keys, "tensors": tensors,
            "written_by": {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                           "mmloader": __version__},
        }
        return commit, arrays

    def _write_group(self, url: str, arrays: dict[str, np.ndarray]) -> None:
        group = zarr.open_group(url, mode="w", storage_options=self._zarr_options())
        for name, a in arrays.items():
            arr = group.create_array(name, shape=a.shape, chunks=(1, *a.shape[1:]), dtype=a.dtype, compressors=None,
                                     fill_value=np.zeros((), a.dtype).item(), config={"write_empty_chunks": True})
            arr[...] = a

    def _publish(self, k: int, commit: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Make shard ``k`` visible, all at once.

        Local: write ``tmp/.tmp-K-...`` completely (data, then ``COMMIT.json``) and ``rename`` it to
        ``shards/K``. If ``shards/K`` exists (another writer was first, or it is corrupt), a valid copy is kept
        (identical content) and ours dropped; an invalid one is moved aside and ours renamed in.
        Object stores: remove an old commit, write the data, write ``COMMIT.json`` last.
        """
        data = json.dumps(commit, separators=(",", ":")).encode()
        rel = self._shard_rel(k)
        if not self.local:
            commit_path = join(self.path, rel, COMMIT)
            if self.fs.exists(commit_path):
                self.fs.rm(commit_path)  # from now on readers see a torn shard: a miss
            self._write_group(join(self.url, rel), arrays)
            _pause_hook(k)
            self.fs.pipe_file(commit_path, data)
            return
        tmpdir = join(self.path, TMP)
        os.makedirs(join(self.path, SHARDS), exist_ok=True)
        os.makedirs(tmpdir, exist_ok=True)
        final = join(self.path, rel)
        tmp = join(tmpdir, f".tmp-{k:06d}-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            self._write_group(tmp, arrays)
            _pause_hook(k)
            with open(join(tmp, COMMIT), "wb") as f:
                f.write(data)
            for _ in range(4):
                try:
                    os.rename(tmp, final)
                    return
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                if self.verify_shard(k)[0] == "complete":
                    return  # another writer published the same windows first
                trash = join(tmpdir, f".trash-{k:06d}-{uuid.uuid4().hex[:8]}")
                try:
                    os.rename(final, trash)
                except FileNotFoundError:
                    continue
                shutil.rmtree(trash, ignore_errors=True)
            raise OSError(f"{final}: could not publish shard {k} (replaced concurrently too often)")
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            self._clean_leftovers(k)

    # -- fill locks (local filesystems; advisory) ------------------------------------------------
    def _lock(self, k: int) -> str | None:
        """Take shard ``k``'s fill lock: its path ("" where there are no locks), or None if someone holds it."""
        if not self.local:
            return ""
        path = join(self.path, LOCKS, f"{k:06d}.lock")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        owner = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}).encode()
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not _lock_is_stale(path):
                    return None
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(owner)
            return path
        return None

    @staticmethod
    def _unlock(lock: str) -> None:
        if lock:
            try:
                os.unlink(lock)
            except FileNotFoundError:
                pass

    def _clean_leftovers(self, k: int | None = None) -> None:
        """Remove temporary/trash shards (of shard ``k``, or all) whose writer is gone, and stale locks."""
        if not self.local:
            return
        for name, path, stale in self._leftovers():
            if stale and (k is None or name.split("-")[1] == f"{k:06d}"):
                shutil.rmtree(path, ignore_errors=True)
        locks = join(self.path, LOCKS)
        if k is None and os.path.isdir(locks):
            for name in os.listdir(locks):
                if _lock_is_stale(join(locks, name)):
                    try:
                        os.unlink(join(locks, name))
                    except FileNotFoundError:
                        pass

    def _leftovers(self) -> list[tuple[str, str, bool]]:
        """``(name, path, stale)`` of the temporary and trash shards on a local disk."""
        tmpdir = join(self.path, TMP)
        if not self.local or not os.path.isdir(tmpdir):
            return []
        out = []
        for name in sorted(os.listdir(tmpdir)):
            if not name.startswith((".tmp-", ".trash-")):
                continue
            path = join(tmpdir, name)
            stale = name.startswith(".trash-")
            if not stale:
                parts = name.split("-")  # .tmp, K, host, pid, rand
                try:
                    mine = parts[2] == _host_tag()
                    stale = (mine and not _pid_alive(int(parts[3]))) or time.time() - os.path.getmtime(path) > LEFTOVER_STALE_S
                except (IndexError, ValueError, OSError):
                    stale = True
            out.append((name, path, stale))
        return out

    def fill(self, progress: bool = True, poll_s: float = 0.1) -> dict[str, int]:
        """Build every shard that is missing, torn or corrupt (eager fill); returns counts.

        Shards being filled by another process (their lock is held) are skipped first and waited for at
        the end (filled here if their lock goes stale). Existing shards are verified (checksums).
        """
        from tqdm.auto import tqdm

        if self.source is None:
            raise CacheError(f"{self.url}: opened for inspection only (no source window set)")
        counts = {"shards": self.n_shards, "filled": 0, "already_complete": 0, "filled_by_others": 0}
        pending = []
        for k in tqdm(range(self.n_shards), desc="cache", unit="shard", disable=not progress):
            if self.verify_shard(k)[0] == "complete":
                counts["already_complete"] += 1
                continue
            lock = self._lock(k)
            if lock is None:
                pending.append(k)
                continue
            try:
                if self.verify_shard(k)[0] != "complete":
                    self._fill_shard(k, strict=True)
                    counts["filled"] += 1
                else:
                    counts["filled_by_others"] += 1
            finally:
                self._unlock(lock)
        for k in pending:
            while True:
                if self.verify_shard(k)[0] == "complete":
                    counts["filled_by_others"] += 1
                    break
                lock = self._lock(k)
                if lock is None:
                    time.sleep(poll_s)
                    continue
                try:
                    self._fill_shard(k, strict=True)
                    counts["filled"] += 1
                finally:
                    self._unlock(lock)
                break
        self._clean_leftovers()
        return counts

    # -- inspection ------------------------------------------------------------------------------
    def verify_shard(self, k: int, deep: bool = True) -> tuple[str, str]:
        """``(state, detail)`` of shard ``k``: ``complete``, ``missing``, ``torn`` (data without a commit) or
        ``corrupt`` (bad commit, or, with ``deep``, a chunk whose checksum does not match)."""
        try:
            shard = self._open_shard(k)
        except FileNotFoundError:
            return "missing", ""
        except _Invalid as e:
            return e.state, str(e)
        except Exception as e:
            return "corrupt", f"{join(self.url, self._shard_rel(k))}: unreadable ({e})"
        if not deep:
            return "complete", ""
        try:
            for name, t in shard.commit["tensors"].items():
                whole = np.asarray(shard.arrays[name][...])
                if len(whole) != len(t["shapes"]):
                    raise ValueError(f"{name!r} has {len(whole)} rows, the commit {len(t['shapes'])}")
                for j, shape in enumerate(t["shapes"]):
                    a = np.ascontiguousarray(whole[(j, *(slice(0, s) for s in shape))])
                    if zlib.crc32(a) != t["crc32"][j]:
                        raise ValueError(f"checksum mismatch in {name!r}, row {j}")
        except Exception as e:
            return "corrupt", f"{join(self.url, self._shard_rel(k))}: {e}"
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
        leftovers = self._leftovers()
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
        from ..errors import StoreFormatError
        from ..store import Store

        c = self.components
        if c.get("cache_version") != CACHE_VERSION or c.get("mmloader_version") != __version__:
            return f"built by mmloader {c.get('mmloader_version')} (cache v{c.get('cache_version')})"
        try:
            store = Store(c["store_url"])
        except StoreFormatError as e:
            return f"store unreadable or gone ({e})"
        m = store.manifest
        if m.get("format_version") != c["store_format_version"]:
            return f"store format v{m.get('format_version')}, cache built from v{c['store_format_version']}"
        if m.get("source_fingerprint") != c["store_source_fingerprint"]:
            return "store re-prepared from another source"
        if _sha256_json(m) != c["store_manifest_sha256"]:
            return "store re-prepared (manifest changed)"
        return None

    def __repr__(self) -> str:
        return f"WindowCache({self.url!r}, fingerprint={self.fingerprint}, {self.n_shards} shards of {self.shard_size})"


def _lock_is_stale(path: str) -> bool:
    try:
        age = time.time() - os.path.getmtime(path)
        with open(path, "rb") as f:
            owner = json.loads(f.read() or b"{}")
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True
    if age > LOCK_STALE_S:
        return True
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        return not _pid_alive(owner["pid"])
    return False


def _read_json(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        with fs.open(path, "rb") as f:
            out = json.loads(f.read())
        return out if isinstance(out, dict) else None
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None


# -- listing and clearing ------------------------------------------------------------------------------
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
        parent, name = os.path.split(path.rstrip("/"))
        trash = os.path.join(parent, f".{name}.deleting-{uuid.uuid4().hex[:8]}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        fs.rm(path, recursive=True)
    return True


def clear_all(root: str | None = None, stale_only: bool = False) -> list[str]:
    """Delete every cache under ``root`` (default ``cache_root()``), or only the stale ones; returns their URLs."""
    gone = []
    for url in list_caches(root):
        if stale_only:
            try:
                if WindowCache.inspect(url).stale_reason() is None:
                    continue
            except CacheError:
                pass
        if clear(url):
            gone.append(url)
    return gone
