"""Writing a store atomically.

A store is published in one step: on a local filesystem everything is written under a hidden temporary
sibling (``.NAME.partial-<random>-<pid>@<host>``) and renamed into place; on other filesystems (``memory://``,
``s3://``), where directories cannot be renamed atomically, the files are written in place (beside a
``.mmloader-writing`` marker) and ``mmloader.json`` is written *last*. Either way a store without its manifest is
refused by the reader, and a writer that fails removes what it wrote. A local writer also removes the partial
folders of earlier writers to the same destination that were killed (their pid is of this host and no longer
alive); a live writer's folder is never touched.

``overwrite`` replaces only an mmloader store (a folder holding ``mmloader.json``, or a non-local store that a
writer left without one: it holds the ``.mmloader-writing`` marker) or an empty folder; anything else (a file,
a folder of other files) raises ``FileExistsError``. ``protect`` names paths (a recipe's source) that the
destination must not be or contain.

Without ``overwrite`` the publish never replaces an existing store: the local rename fails when the
destination exists (two concurrent writers to one destination: exactly one wins, the other raises
``FileExistsError`` and removes its partial folder); elsewhere the manifest's absence is checked right before
it is written.

Integrity (format version 2): every Zarr chunk ends with a crc32c checksum (``zstd`` then ``crc32c``), every
chunk is written even when it holds only fill values (so an absent chunk is always an error), the manifest's
``files`` records each file's size and, for every file but media copied into ``media/``, its sha256 (Zarr
chunks and ``zarr.json`` included: hashed as Zarr writes them, so a chunk swapped with another of the same size
is found), and each store gets a ``generation`` id (uuid4) written into the manifest and into every Zarr
group's attrs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from .._version import __version__
from ..errors import StoreFormatError
from ..fsutil import get_fs, is_local, join, normalize_url, pid_alive, probe_exists
from .chunks import chunk_periods
from .schema import FORMAT, FORMAT_VERSION, MANIFEST, conform, load_schema, table_file


WRITING_MARKER = ".mmloader-writing"  # non-local stores: present from a writer's start until its manifest is written
TIMESERIES_CHUNK_ROWS = 4096
MAX_ID_LENGTH = 200
# zstd, then a crc32c of the compressed bytes: zarr verifies it on every chunk decode
ZARR_COMPRESSORS = (ZstdCodec(level=0), Crc32cCodec())
ZARR_CHECKSUM_ONLY = (Crc32cCodec(),)  # samples zstd barely shrinks (sensor noise): stored raw, still checksummed
ZSTD_MIN_SAVING = 0.10
ZARR_ARRAY_CONFIG = {"write_empty_chunks": True}  # every chunk is stored: an absent one is damage, not fill
_CHUNK_KEY = re.compile(r"\.zarr/[^/]+/c(/|$)")


def zstd_pays(sample: np.ndarray) -> bool:
    """Whether zstd shrinks ``sample`` (a time series' first chunk) by at least ``ZSTD_MIN_SAVING``: if not, its
    ``data`` is stored uncompressed, and a window read skips decompression (~0.15 ms a 4,096 x 6 chunk)."""
    from numcodecs import Zstd

    raw = np.ascontiguousarray(sample).tobytes()
    return not raw or len(Zstd(level=0).encode(raw)) <= (1 - ZSTD_MIN_SAVING) * len(raw)


def is_chunk_file(rel: str) -> bool:
    """Whether a path inside a store is a Zarr chunk (checksummed by its codec)."""
    return _CHUNK_KEY.search(rel) is not None


def has_sha256(rel: str) -> bool:
    """Whether the manifest records a sha256 of this file: all but media copied into the store (``media/``:
    large; identified by size, mtime and fast hash in ``streams``). Zarr chunks have one too (besides their
    crc32c): it binds each chunk to its place, so a chunk swapped with another of the same size is found."""
    return not rel.startswith("media/")


def _host_tag() -> str:
    """This host's name as it appears in partial folder names (only ``[A-Za-z0-9._-]``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname() or "localhost")[:64]


def _owner_tag() -> str:
    return f"{uuid.uuid4().hex[:8]}-{os.getpid()}@{_host_tag()}"


def _same_or_inside(inner: str, outer: str) -> bool:
    """Whether the path/URL ``inner`` is ``outer`` or lies inside it (local paths with symlinks resolved)."""
    a, b = normalize_url(inner), normalize_url(outer)
    if "://" in a or "://" in b:
        pa_, _, ra = a.partition("://")
        pb, _, rb = b.partition("://")
        if "://" not in a or "://" not in b or pa_.lower() != pb.lower():
            return False
        ra, rb = ra.rstrip("/"), rb.rstrip("/")
        return ra == rb or ra.startswith(rb + "/")
    a, b = os.path.realpath(a), os.path.realpath(b)
    try:
        return os.path.commonpath([a, b]) == b
    except ValueError:  # different drives
        return False


class _HashingStore(WrapperStore):
    """A Zarr store that records the sha256 of every key it writes (``sink[prefix/key]``): the manifest's
    checksums without reading the store back (on S3 that would download it)."""

    def __init__(self, store: Any, prefix: str = "", sink: dict[str, str] | None = None):
        super().__init__(store)
        self._prefix = prefix
        self._sink = {} if sink is None else sink

    def _with_store(self, store: Any) -> "_HashingStore":
        return type(self)(store, self._prefix, self._sink)

    def _rel(self, key: str) -> str:
        return f"{self._prefix}/{key}" if self._prefix else key

    async def set(self, key: str, value: Any) -> None:
        await self._store.set(key, value)
        self._sink[self._rel(key)] = hashlib.sha256(value.as_numpy_array()).hexdigest()

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        self._sink.pop(self._rel(key), None)  # maybe not written: hashed from the file at commit
        await self._store.set_if_not_exists(key, value)

    async def _set_many(self, values: Any) -> None:
        for key, value in values:
            await self.set(key, value)

    async def delete(self, key: str) -> None:
        self._sink.pop(self._rel(key), None)
        await self._store.delete(key)

    async def delete_dir(self, prefix: str) -> None:
        start = self._rel(prefix).rstrip("/") + "/"
        for k in [k for k in self._sink if k.startswith(start)]:
            del self._sink[k]
        await self._store.delete_dir(prefix)


def check_recording_id(rid: str, where: str) -> str:
    """Return ``rid`` if it is safe as one path component of a store, else raise :class:`StoreFormatError`.

    Recording ids and stream names become directory names (``timeseries/{recording_id}/{stream}.zarr``), so
    they must be a single, ordinary path component: a non-empty ``str`` of at most 200 characters, not
    ``.`` / ``..``, not starting with ``.`` (hidden; also the writer's ``.NAME.partial-*`` names), and without
    ``/``, ``\\``, NUL or other control characters. ``where`` names the source of the value in the message
    (e.g. ``"ego4d metadata.json: video_uid"``). Recipes and :mod:`mmloader.recipes.custom` call this on their ids.
    """
    if not isinstance(rid, str):
        raise StoreFormatError(f"{where}: id must be a string, got {type(rid).__name__} {rid!r}")
    problem = None
    if rid == "":
        problem = "is empty"
    elif rid in (".", ".."):
        problem = "is a relative path component"
    elif rid.startswith("."):
        problem = "starts with '.'"
    elif "/" in rid or "\\" in rid:
        problem = "contains a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in rid):
        problem = "contains a NUL or control character"
    elif len(rid) > MAX_ID_LENGTH:
        problem = f"is longer than {MAX_ID_LENGTH} characters ({len(rid)})"
    if problem is not None:
        raise StoreFormatError(f"{where}: id {rid!r} {problem}; ids must be safe single path components")
    return rid


class StoreWriter:
    """Writes one store; use as a context manager (commit on success, abort on error).

    >>> with StoreWriter("/data/store", dataset="mine", source_fingerprint="abc") as w:
    ...     w.write_timeseries("rec1", "imu", t_ns, data, channels=[...], units=[...], rate_hz=200.0)
    ...     w.write_table("recordings", recordings)
    """

    def __init__(
        self,
        url: str | os.PathLike,
        dataset: str,
        source_fingerprint: str,
        options: dict[str, Any] | None = None,
        overwrite: bool = False,
        protect: Sequence[str | os.PathLike] = (),
        **storage_options: Any,
    ):
        self.url = normalize_url(url)
        self.dataset = dataset
        self.source_fingerprint = source_fingerprint
        self.options = dict(options or {})
        self.fs, self.path = get_fs(self.url, **storage_options)
        self.storage_options = storage_options
        self._events: dict[str, str] = {}
        self._tables: dict[str, str] = {}
        self._sha256: dict[str, str] = {}
        self.generation = str(uuid.uuid4())
        self._done = False
        self._protected: list[str] = []
        self.protect(protect)
        self._local = is_local(self.fs)
        # the first request: an unreachable S3 endpoint fails fast, in one line naming the URL
        if probe_exists(self.fs, self.path, self.url, storage_options):
            if not overwrite:
                raise FileExistsError(f"{self.url}: already exists (pass overwrite=True / --overwrite to replace it)")
            self._check_replaceable(self.path)
        self._overwrite = overwrite
        if self._local:
            parent, name = os.path.split(self.path)
            os.makedirs(parent, exist_ok=True)
            self._remove_stale_partials(parent, name)
            self.work_path = os.path.join(parent, f".{name}.partial-{_owner_tag()}")
            os.makedirs(self.work_path)
            self.work_url = self.work_path
        else:
            if self.fs.exists(self.path):
                self.fs.rm(self.path, recursive=True)
            self.fs.makedirs(self.path, exist_ok=True)
            self.work_path = self.path
            self.work_url = self.url
            with self.fs.open(join(self.path, WRITING_MARKER), "w") as f:  # "an mmloader store being written"
                json.dump({"generation": self.generation, "pid": os.getpid(), "host": _host_tag()}, f)

    # -- destination safety ----------------------------------------------------------------------
    def protect(self, paths: Sequence[str | os.PathLike] | str | os.PathLike) -> None:
        """Refuse (``ValueError``) a destination that is, or contains, one of ``paths`` (a recipe's source
        folder, the media files a store is written from): publishing there would delete them. May be called
        while writing (e.g. with each recording's media files); on a local filesystem nothing is replaced
        before ``commit``."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        for p in paths:
            if p is None or os.fspath(p) == "":
                continue
            if _same_or_inside(os.fspath(p), self.url):
                what = "is" if _same_or_inside(self.url, os.fspath(p)) else "contains"
                raise ValueError(
                    f"{self.url}: the destination {what} {normalize_url(p)}, which this store is written from; "
                    "writing (or --overwrite) there would delete it: choose another destination"
                )
            self._protected.append(os.fspath(p))

    def _check_replaceable(self, path: str) -> None:
        """An existing destination may be replaced only when it is an mmloader store or an empty folder."""
        why = None
        if not self.fs.isdir(path):
            why = "is a file, not an mmloader store"
        elif not (self.fs.exists(join(path, MANIFEST)) or self.fs.exists(join(path, WRITING_MARKER))):
            if self.fs.ls(path, detail=False):
                why = f"is a folder without {MANIFEST}: not an mmloader store"
        if why is not None:
            raise FileExistsError(
                f"{self.url}: already exists and {why}, so it will not be replaced (overwrite / --overwrite "
                "replaces only an mmloader store or an empty folder); choose another destination or remove it"
            )

    @staticmethod
    def _remove_stale_partials(parent: str, name: str) -> None:
        """Remove ``.NAME.partial-*`` folders of killed writers: owner on this host, pid no longer alive. A
        ``.NAME.old-*`` folder (the previous store, moved aside by an overwrite) goes only when ``NAME`` exists."""
        pattern = re.compile(rf"^\.{re.escape(name)}\.(partial|old)-[0-9a-f]{{8}}-(\d+)@(.+)$")
        host = _host_tag()
        try:
            entries = os.listdir(parent)
        except OSError:
            return
        for entry in entries:
            m = pattern.match(entry)
            if m is None or m.group(3) != host or pid_alive(int(m.group(2))):
                continue
            if m.group(1) == "old" and not os.path.isdir(os.path.join(parent, name)):
                continue  # a killed overwrite between its two renames: this is the only copy of the store
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()

    # -- content ---------------------------------------------------------------------------------
    def _url(self, rel: str) -> str:
        return join(self.work_url, rel)

    def write_timeseries(
        self,
        recording_id: str,
        stream: str,
        t_ns: np.ndarray,
        data: np.ndarray,
        channels: list[str],
        units: list[str],
        rate_hz: float,
        chunk_rows: int = TIMESERIES_CHUNK_ROWS,
    ) -> str:
        """Write a time series: ``t_ns (N,) int64`` strictly increasing, ``data (N, C) float32``.

        Returns the path inside the store (for the ``uri`` column of ``streams``).
        """
        t_ns = np.asarray(t_ns)
        data = np.asarray(data)
        where = f"timeseries {recording_id}/{stream}"
        if t_ns.ndim != 1 or t_ns.dtype != np.int64:
            raise StoreFormatError(f"{where}: t_ns must be a 1-D int64 array, got {t_ns.dtype} {t_ns.shape}")
        if data.ndim != 2 or data.shape[0] != t_ns.shape[0]:
            raise StoreFormatError(f"{where}: data must be (N={t_ns.shape[0]}, C), got {data.shape}")
        if data.shape[1] != len(channels) or len(units) != len(channels):
            raise StoreFormatError(f"{where}: {data.shape[1]} columns but {len(channels)} channels, {len(units)} units")
        if t_ns.size > 1 and not np.all(np.diff(t_ns) > 0):
            raise StoreFormatError(f"{where}: t_ns must be strictly increasing")
        if not np.all(np.isfinite(data)):
            raise StoreFormatError(f"{where}: data contains NaN or inf")
        check_recording_id(recording_id, f"{where}: recording id")
        check_recording_id(stream, f"{where}: stream name")
        rel = load_schema()["timeseries"]["path_pattern"].format(recording_id=recording_id, stream=stream)
        group = self._open_group(rel)
        n = max(1, t_ns.shape[0])
        rows = min(chunk_rows, n)
        self._create_array(group, "t_ns", t_ns, chunks=(rows,))
        self._create_array(group, "t_coarse", t_ns[::rows].copy())
        self._create_array(group, "t_period", chunk_periods(t_ns, rows))
        data = data.astype(np.float32, copy=False)
        self._create_array(group, "data", data, chunks=(rows, data.shape[1]),
                           compressors=ZARR_COMPRESSORS if zstd_pays(data[:rows]) else ZARR_CHECKSUM_ONLY)
        group.attrs.update(
            {"channels": list(channels), "units": list(units), "rate_hz": float(rate_hz), "chunk_rows": rows,
             "generation": self.generation}
        )
        return rel

    def write_video_index(self, recording_id: str, stream: str, pts_ns: np.ndarray, keyframe: np.ndarray) -> str:
        """Write the per-frame pts index (ns, sorted) and keyframe flags of a video stream."""
        where = f"video index {recording_id}/{stream}"
        check_recording_id(recording_id, f"{where}: recording id")
        check_recording_id(stream, f"{where}: stream name")
        rel = load_schema()["video_index"]["path_pattern"].format(recording_id=recording_id, stream=stream)
        group = self._open_group(rel)
        self._create_array(group, "pts_ns", np.asarray(pts_ns, dtype=np.int64))
        self._create_array(group, "keyframe", np.asarray(keyframe, dtype=bool))
        group.attrs["generation"] = self.generation
        return rel

    @staticmethod
    def _create_array(group: zarr.Group, name: str, data: np.ndarray, chunks: Any = "auto",
                      compressors: tuple[Any, ...] = ZARR_COMPRESSORS) -> None:
        group.create_array(name, data=data, chunks=chunks, compressors=compressors, config=ZARR_ARRAY_CONFIG)

    def write_table(self, kind: str, table: pa.Table) -> str:
        """Write ``recordings``, ``streams`` or ``gaps``, cast to (and checked against) the schema."""
        rel = table_file(kind)
        table = conform(table, kind, where=f"{rel} (being written)")
        for column in ("recording_id", "stream"):
            if column in table.column_names:
                for value in pa.compute.unique(table.column(column)).to_pylist():
                    check_recording_id(value, f"{rel} (being written): column '{column}'")
        self._write_parquet(rel, table)
        self._tables[kind] = rel
        return rel

    def write_events(self, name: str, table: pa.Table) -> str:
        """Write an events table (narrations, summaries, labels...) as ``events/{name}.parquet``."""
        check_recording_id(name, "events table name")
        rel = load_schema()["events"]["file_pattern"].format(name=name)
        table = conform(table, "events", where=f"{rel} (being written)")
        self._write_parquet(rel, table)
        self._events[name] = rel
        return rel

    def write_json(self, rel: str, obj: Any) -> str:
        """Write a JSON document (reports) inside the store."""
        self.fs.makedirs(os.path.dirname(join(self.work_path, rel)), exist_ok=True)
        with self.fs.open(join(self.work_path, rel), "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True, default=_json_default)
        return rel

    def _write_parquet(self, rel: str, table: pa.Table) -> None:
        path = join(self.work_path, rel)
        self.fs.makedirs(os.path.dirname(path), exist_ok=True)
        sink = pa.BufferOutputStream()  # serialise in Arrow memory, then one plain write (see fsutil.read_arrow_buffer)
        pq.write_table(table, sink)
        buf = memoryview(sink.getvalue())
        with self.fs.open(path, "wb") as f:
            f.write(buf)
        self._sha256[rel] = hashlib.sha256(buf).hexdigest()

    def _open_group(self, rel: str) -> zarr.Group:
        """A new Zarr group at ``rel``, through a store that records the sha256 of every file Zarr writes."""
        if self._local:
            inner: Any = LocalStore(join(self.work_path, rel))
        else:
            inner = FsspecStore.from_url(self._url(rel), storage_options=self.storage_options or {})
        return zarr.open_group(_HashingStore(inner, rel, self._sha256), mode="w", zarr_format=3)

    # -- publish ---------------------------------------------------------------------------------
    def commit(self) -> str:
        """Write the manifest last and publish the store; returns its URL.

        Without ``overwrite`` an existing store at the destination is never replaced: if another writer
        published there first this raises ``FileExistsError`` and removes what this writer wrote.
        """
        if self._done:
            return self.url
        missing = {"recordings", "streams", "gaps"} - set(self._tables)
        if missing:
            self.abort()
            raise StoreFormatError(f"{self.url}: cannot commit a store without the tables {sorted(missing)}")
        files: dict[str, dict[str, Any]] = {}
        root = self.fs._strip_protocol(self.work_path)
        for p in self.fs.find(self.work_path, detail=True).values():
            rel = p["name"][len(root):].lstrip("/")
            if rel in (MANIFEST, WRITING_MARKER):
                continue
            entry: dict[str, Any] = {"size": int(p["size"])}
            if has_sha256(rel):
                entry["sha256"] = self._sha256.get(rel) or self._hash(rel)
            files[rel] = entry
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "created_by": f"mmloader {__version__}",
            "generation": self.generation,
            "source_fingerprint": self.source_fingerprint,
            "options": self.options,
            "tables": dict(self._tables),
            "events": dict(self._events),
            "files": dict(sorted(files.items())),
        }
        if not self._local and not self._overwrite and self.fs.exists(join(self.path, MANIFEST)):
            # another writer published here since this one started (no atomic publish on this filesystem);
            # its files and ours share paths, so nothing is removed: its manifest's checksums tell
            self._done = True
            raise FileExistsError(
                f"{self.url}: another writer published a store here while this one was writing; "
                "run `mmloader validate` on it, or write again with overwrite=True / --overwrite"
            )
        with self.fs.open(join(self.work_path, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, default=_json_default)
        if self._local:
            self._publish_local()
        else:
            try:
                self.fs.rm(join(self.work_path, WRITING_MARKER))
            except OSError:
                pass  # harmless: a store with its manifest is complete; the marker is not in 'files'
        self._done = True
        return self.url

    def _hash(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.fs.open(join(self.work_path, rel), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def _publish_local(self) -> None:
        """Rename the finished folder onto the destination; refuse (never replace) without overwrite."""
        exists_errnos = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR)
        if not self._overwrite:
            try:
                # rename(2) of a directory fails when the target is a file or a non-empty directory
                # (every store holds its manifest), so of two writers racing here exactly one wins
                os.rename(self.work_path, self.path)
            except OSError as e:
                self.abort()
                if e.errno in exists_errnos:
                    raise FileExistsError(
                        f"{self.url}: already exists (another prepare finished first); "
                        "pass overwrite=True / --overwrite to replace it"
                    ) from None
                raise
            return
        parent, name = os.path.split(self.path)
        trash = os.path.join(parent, f".{name}.old-{_owner_tag()}")
        try:
            os.rename(self.path, trash)
        except FileNotFoundError:
            trash = None
        if trash is not None:
            try:  # checked again once moved aside: what is replaced is what was checked
                self._check_replaceable(trash)
            except FileExistsError:
                os.rename(trash, self.path)
                self.abort()
                raise
        try:
            os.rename(self.work_path, self.path)
        except OSError as e:
            if trash is not None:
                try:
                    os.rename(trash, self.path)  # put the old store back
                except OSError:
                    pass
            self.abort()
            if e.errno in exists_errnos:
                raise FileExistsError(f"{self.url}: another writer published a store here at the same time") from None
            raise
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def abort(self) -> None:
        """Remove everything this writer wrote; no store is left behind."""
        if self._done:
            return
        self._done = True
        try:
            if self.fs.exists(self.work_path):
                self.fs.rm(self.work_path, recursive=True)
        except OSError:
            pass


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
