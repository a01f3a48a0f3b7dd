"""Opening and validating a prepared store on any fsspec URL.

What a read checks (format version 2), cheaply, once per load:

- a Parquet table: the sha256 of its bytes against the manifest loaded at open (the reader reads the whole file
  anyway); a mismatch is damage, or a store replaced since it was opened;
- a Zarr group (once per handle; handles are cached): the sha256 of its ``zarr.json`` and of each array's
  ``zarr.json`` against the manifest (Zarr reads them anyway; small files), its ``generation`` attr equals the
  manifest's, and every chunk its arrays' shapes imply is present (one listing of the group: the writer stores
  every chunk, so an absent one is damage, never fill values);
- a Zarr chunk, each time it is loaded: present, and the sha256 of its bytes against the manifest (a chunk
  swapped with another of the same size, or copied from another store, is refused), then its crc32c (the
  codec); on a local filesystem also that the store's root is still the directory opened (a
  ``prepare --overwrite`` renames a new directory into place), so a replaced store raises instead of mixing
  versions.

Zarr reads every file through :class:`_VerifiedStore`, which does the per-file checks. ``validate()`` checks
everything deeply: every file's size and sha256, every chunk present and decoded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from ..errors import StoreFormatError
from ..fsutil import get_fs, is_local, join, normalize_url, read_arrow_buffer, probe_exists
from ..lru import LRU
from .chunks import ArrayLayout, ChunkDecodeError, decode_chunk
from .schema import check_manifest, check_table, load_schema
from .schema import MANIFEST
from .writer import has_sha256, is_chunk_file

HANDLE_CACHE = 4096  # open time-series groups kept per process (a few KB each when read directly)
CHUNK_CACHE = 1 << 16  # decoded time-series chunks kept per process, at most ...
CHUNK_CACHE_MB = 1024.0  # ... and at most this many MiB of them (env MMLOADER_CHUNK_CACHE_MB overrides)


def chunk_cache_mb() -> float:
    """The per-process budget (MiB) for decoded time-series chunks: ``MMLOADER_CHUNK_CACHE_MB`` or the default."""
    raw = os.environ.get("MMLOADER_CHUNK_CACHE_MB")
    if raw is None:
        return CHUNK_CACHE_MB
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"MMLOADER_CHUNK_CACHE_MB must be a number of MiB, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"MMLOADER_CHUNK_CACHE_MB must be > 0, got {raw!r}")
    return value


def _chunk_bytes(chunk: tuple[np.ndarray, np.ndarray, int]) -> int:
    return int(chunk[0].nbytes + chunk[1].nbytes)


def _period(t: np.ndarray) -> int:
    """The exact sample period (ns) of a chunk's times when every interval is the same, -1 for a single sample,
    0 when the intervals differ."""
    if t.shape[0] < 2:
        return -1
    d = np.diff(t)
    return int(d[0]) if (d == d[0]).all() else 0


TIMESERIES_ARRAYS = ("t_ns", "data", "t_coarse")
VIDEO_INDEX_ARRAYS = ("pts_ns", "keyframe")


class _Bytes:
    """Bytes read directly, shaped like the Zarr buffer ``_verify_zarr_file`` checks."""

    def __init__(self, raw: bytes):
        self.raw = raw

    def as_numpy_array(self) -> np.ndarray:
        return np.frombuffer(self.raw, dtype=np.uint8)


class ZarrFileError(StoreFormatError):
    """A Zarr file that failed a check in :class:`_VerifiedStore`; ``url`` names it, ``rel`` is its path in the
    store, ``kind`` is ``"missing"`` or ``"damaged"`` and ``detail`` says how (for a chunk, the reader adds its
    array and index)."""

    def __init__(self, message: str, url: str, rel: str, kind: str, detail: str):
        super().__init__(message)
        self.url, self.rel, self.kind, self.detail = url, rel, kind, detail


class _VerifiedStore(WrapperStore):
    """The Zarr store of one group of a store, checking every file Zarr reads against the manifest.

    A key listed in the manifest: present (an absent chunk raises instead of reading as fill values) and with
    the sha256 the manifest records; a key not listed is refused if it exists (Zarr then asks only for
    ``zarr.json`` and the chunks the verified metadata implies). Partial reads (``byte_range``: sharding, which
    the writer does not use) are passed through unchecked.
    """

    def __init__(self, store: Any, prefix: str, reader: "Store"):
        super().__init__(store)
        self._prefix = prefix
        self._reader = reader

    def _with_store(self, store: Any) -> "_VerifiedStore":
        return type(self)(store, self._prefix, self._reader)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        buf = await self._store.get(key, prototype, byte_range)
        return self._reader._verify_zarr_file(f"{self._prefix}/{key}", buf, byte_range is None)

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def _get_many(self, requests: Any):
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)


@dataclass(frozen=True)
class TimeSeries:
    """A time series read from a store: ``t_ns (N,) int64`` on the recording clock, ``data (N, C) float32``."""

    t_ns: np.ndarray
    data: np.ndarray
    channels: tuple[str, ...]
    units: tuple[str, ...]
    rate_hz: float


class Store:
    """A prepared store, validated on open.

    Opening checks the manifest (format and version), that the tables it lists exist with the checksums the
    manifest records, and that their columns have the schema's types. Reads check chunks, groups and files as
    they load them (see the module docstring). ``validate()`` checks every file and every chunk.
    """

    def __init__(self, url: str | os.PathLike, **storage_options: Any):
        self.url = normalize_url(url)
        self.storage_options = storage_options
        self.fs, self.path = get_fs(self.url, **storage_options)
        self._local = is_local(self.fs)
        where = join(self.url, MANIFEST)
        if not probe_exists(self.fs, join(self.path, MANIFEST), self.url, storage_options):  # fails fast if unreachable
            if self.fs.exists(self.path):
                raise StoreFormatError(
                    f"{where}: missing. {self.url} is not an mmloader store, or its prepare was interrupted; "
                    "prepare it again (mmloader prepare DATASET SRC DST)"
                )
            raise StoreFormatError(f"{self.url}: no such store")
        self._root_id = self._root_identity()  # before the manifest: a swap in between reads as "replaced"
        try:
            with self.fs.open(join(self.path, MANIFEST), "r") as f:
                manifest = json.load(f)
        except json.JSONDecodeError as e:
            raise StoreFormatError(f"{where}: not valid JSON ({e})") from None
        check_manifest(manifest, where)
        self.manifest: dict[str, Any] = manifest
        self.generation: str = manifest["generation"]
        self.recordings = self._read_table("recordings")
        self.streams = self._read_table("streams")
        self.gaps = self._read_table("gaps")
        self._handles: LRU = LRU(HANDLE_CACHE)
        self._chunks: LRU = LRU(CHUNK_CACHE, weigh=_chunk_bytes, max_weight=int(chunk_cache_mb() * (1 << 20)))
        self._stream_rows: dict[tuple[str, str], dict[str, Any]] | None = None

    def __reduce__(self):
        # Workers reopen the store from its URL: no tables, handles or file objects are pickled.
        return (_reopen, (self.url, self.storage_options, self.generation))

    # -- integrity -------------------------------------------------------------------------------
    def _root_identity(self) -> tuple[int, int] | None:
        if not self._local:
            return None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return (-1, -1)
        return (st.st_dev, st.st_ino)

    def _replaced(self, detail: str = "") -> StoreFormatError:
        return StoreFormatError(
            f"{self.url}: the store was replaced since it was opened; reopen it (mmloader.open / Store(url)){detail}"
        )

    def _check_not_replaced(self) -> None:
        """On a local filesystem: the store's root is still the directory opened (one stat)."""
        if self._local and self._root_identity() != self._root_id:
            raise self._replaced()

    # -- tables ----------------------------------------------------------------------------------
    def _read_parquet(self, rel: str) -> pa.Table:
        """Read a Parquet file of the store, verified against the sha256 in the manifest loaded at open."""
        where = join(self.url, rel)
        entry = self.manifest["files"].get(rel)
        if entry is None or "sha256" not in entry:
            raise StoreFormatError(f"{where}: not listed with a checksum in {MANIFEST}'s 'files'")
        try:
            buf = read_arrow_buffer(join(self.path, rel), self.fs)
        except FileNotFoundError:
            self._check_not_replaced()
            raise StoreFormatError(f"{where}: missing (listed in {MANIFEST})") from None
        digest = hashlib.sha256(memoryview(buf)).hexdigest()
        if digest != entry["sha256"]:
            self._check_not_replaced()
            raise StoreFormatError(self._file_mismatch(where, digest, buf.size, entry, buf))
        try:
            return pq.read_table(pa.BufferReader(buf))
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreFormatError(f"{where}: not a readable Parquet file ({e})") from None

    @staticmethod
    def _file_mismatch(where: str, digest: str, size: int, entry: dict[str, Any], buf: Any = None) -> str:
        if buf is not None and where.endswith(".parquet"):
            try:
                pq.read_metadata(pa.BufferReader(buf))
            except (pa.ArrowInvalid, OSError) as e:
                return (f"{where}: not a readable Parquet file ({e}); its sha256 differs from {MANIFEST}'s: "
                        "the file is damaged, prepare the store again")
        return (f"{where}: checksum mismatch (sha256 {digest[:16]}..., {size} bytes; {MANIFEST} records "
                f"{str(entry.get('sha256'))[:16]}..., {entry['size']} bytes): the file is damaged or was changed after the "
                "store was written; prepare the store again")

    def _read_table(self, kind: str) -> pa.Table:
        rel = self.manifest["tables"].get(kind)
        if rel is None:
            raise StoreFormatError(f"{join(self.url, MANIFEST)}: field 'tables' has no '{kind}' entry")
        table = self._read_parquet(rel)
        check_table(table, kind, where=join(self.url, rel))
        return table

    @property
    def dataset(self) -> str:
        return self.manifest["dataset"]

    @property
    def event_names(self) -> list[str]:
        return sorted(self.manifest["events"])

    def events(self, name: str) -> pa.Table:
        """An events table (e.g. ``narrations``), schema-checked."""
        if name not in self.manifest["events"]:
            raise KeyError(f"{self.url}: no events table '{name}' (has {self.event_names})")
        rel = self.manifest["events"][name]
        table = self._read_parquet(rel)
        check_table(table, "events", where=join(self.url, rel))
        return table

    def stream_row(self, recording_id: str, stream: str) -> dict[str, Any]:
        """The ``streams`` row of (recording, stream) as a dict."""
        if self._stream_rows is None:
            self._stream_rows = {(r["recording_id"], r["stream"]): r for r in self.streams.to_pylist()}
        row = self._stream_rows.get((recording_id, stream))
        if row is None:
            raise KeyError(f"{self.url}: recording {recording_id!r} has no stream {stream!r}")
        return row

    def report(self) -> dict[str, Any]:
        """The recipe's prepare report (``reports/prepare.json``), or {} if the store has none."""
        rel = load_schema()["reports"]["file"]
        entry = self.manifest["files"].get(rel)
        if entry is None:
            return {}
        where = join(self.url, rel)
        try:
            with self.fs.open(join(self.path, rel), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            self._check_not_replaced()
            raise StoreFormatError(f"{where}: missing (listed in {MANIFEST})") from None
        digest = hashlib.sha256(raw).hexdigest()
        if digest != entry.get("sha256"):
            self._check_not_replaced()
            raise StoreFormatError(self._file_mismatch(where, digest, len(raw), entry))
        return json.loads(raw)

    # -- arrays ----------------------------------------------------------------------------------
    def _group(self, rel: str) -> zarr.Group:
        """Open a Zarr group of the store and check that it belongs to the generation opened."""
        where = join(self.url, rel)
        try:
            if self._local:
                inner: Any = LocalStore(join(self.path, rel), read_only=True)
            else:
                inner = FsspecStore.from_url(where, storage_options=self.storage_options or {}, read_only=True)
            g = zarr.open_group(_VerifiedStore(inner, rel, self), mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            self._check_not_replaced()
            raise StoreFormatError(f"{where}: missing or not a Zarr group ({e})") from None
        found = g.attrs.get("generation")
        if found != self.generation:
            raise self._replaced(f". {where} is of generation {found!r}, the manifest opened is of {self.generation!r}")
        return g

    def _verify_zarr_file(self, rel: str, buf: Any, whole: bool) -> Any:
        """``buf`` (the bytes of the store's file ``rel`` as Zarr read them, None when absent), checked against
        the manifest opened; returned unchanged when it passes (see :class:`_VerifiedStore`)."""
        entry = self.manifest["files"].get(rel)
        url = join(self.url, rel)
        if entry is None:
            if buf is None:
                return None
            self._check_not_replaced()
            raise ZarrFileError(f"{url}: not listed in {MANIFEST}'s 'files' (not written with this store); "
                                "prepare the store again", url, rel, "damaged", "not listed in the manifest")
        if buf is None:
            if not is_chunk_file(rel):
                return None  # zarr.json: Zarr's own "not found" (group or array missing) follows
            self._check_not_replaced()
            raise ZarrFileError(f"{url}: missing (listed in {MANIFEST}); the store is damaged: run "
                                f"`mmloader validate {self.url}` and prepare it again", url, rel, "missing",
                                "missing")
        if not whole:
            return buf
        raw = buf.as_numpy_array()
        digest = hashlib.sha256(raw).hexdigest()
        if digest == entry.get("sha256"):
            return buf
        self._check_not_replaced()
        if is_chunk_file(rel):
            import google_crc32c  # zarr's crc32c codec uses it

            crc_ok = raw.size > 4 and np.uint32(google_crc32c.value(raw[:-4].tobytes())).tobytes() == raw[-4:].tobytes()
            detail = ("sha256 differs from the manifest's, crc32c intact: another chunk's data (swapped or "
                      "copied in)" if crc_ok else "crc32c checksum mismatch")
            raise ZarrFileError(f"{url}: damaged ({detail}); run `mmloader validate {self.url}` and prepare the "
                                "store again", url, rel, "damaged", detail)
        if rel.endswith("zarr.json"):
            try:
                found = json.loads(raw.tobytes()).get("attributes", {}).get("generation")
            except (ValueError, AttributeError):
                found = None
            if found is not None and found != self.generation:
                e = self._replaced(f". {join(self.url, rel.rsplit('/', 1)[0])} is of generation {found!r}, the "
                                   f"manifest opened is of {self.generation!r}")
                e.url = url  # type: ignore[attr-defined]
                raise e
        raise ZarrFileError(self._file_mismatch(url, digest, raw.size, entry), url, rel, "damaged",
                            "sha256 mismatch")

    def _list(self, rel: str) -> set[str]:
        """Paths (relative to the store root) of every file under ``rel``: one listing."""
        root = self.fs._strip_protocol(self.path).rstrip("/")
        try:
            found = self.fs.find(join(self.path, rel))
        except FileNotFoundError:
            return set()
        return {p[len(root):].lstrip("/") for p in found}

    @staticmethod
    def _chunk_key(arr: zarr.Array | ArrayLayout, idx: tuple[int, ...]) -> str:
        return arr.key(idx) if isinstance(arr, ArrayLayout) else arr.metadata.encode_chunk_key(idx)

    @staticmethod
    def _grid(arr: zarr.Array | ArrayLayout) -> tuple[int, ...]:
        return arr.grid_shape if isinstance(arr, ArrayLayout) else arr.cdata_shape

    def _missing_chunks(self, rel: str,
                        arrays: dict[str, zarr.Array | ArrayLayout]) -> list[tuple[str, str, tuple[int, ...]]]:
        """(chunk path, array name, chunk index) of every chunk the arrays' shapes imply but the store lacks.

        Local: one stat per chunk; elsewhere one listing of the group (no request per chunk).
        """
        present = None if self._local else self._list(rel)
        out = []
        for name, arr in arrays.items():
            for idx in np.ndindex(*self._grid(arr)):
                key = f"{rel}/{name}/{self._chunk_key(arr, idx)}"
                if not (os.path.exists(join(self.path, key)) if present is None else key in present):
                    out.append((key, name, idx))
        return out

    def _open_group(
        self, rel: str, names: tuple[str, ...], check: tuple[str, ...] | None = None
    ) -> tuple[zarr.Group, dict[str, zarr.Array]]:
        """A checked group and its arrays ``names``: generation matches, arrays present, and no chunk of the
        arrays ``check`` (default: all of ``names``) absent."""
        g = self._group(rel)
        arrays = {}
        for name in names:
            try:
                arrays[name] = g[name]
            except KeyError:
                raise StoreFormatError(f"{join(self.url, rel)}: missing array '{name}'") from None
        check = names if check is None else check
        self._check_chunks_present(rel, {name: arrays[name] for name in check})
        return g, arrays

    def _check_chunks_present(self, rel: str, arrays: dict[str, zarr.Array | ArrayLayout]) -> None:
        """StoreFormatError naming the first chunk of ``arrays`` the store lacks (and how many more)."""
        missing = self._missing_chunks(rel, arrays)
        if missing:
            self._check_not_replaced()
            key, name, idx = missing[0]
            raise StoreFormatError(
                f"{join(self.url, key)}: missing chunk {idx} of array '{name}'"
                + (f" (and {len(missing) - 1} more chunks of {rel})" if len(missing) > 1 else "")
                + f"; the store is damaged: run `mmloader validate {self.url}` and prepare it again"
            )

    def _damaged_chunk(self, url: str, name: str, idx: tuple[int, ...], detail: str) -> StoreFormatError:
        return StoreFormatError(f"{url}: chunk {idx} of array '{name}' is damaged ({detail}); run "
                                f"`mmloader validate {self.url}` and prepare the store again")

    def _unreadable_chunk(self, url: str, name: str, idx: tuple[int, ...], e: ZarrFileError) -> StoreFormatError:
        """A chunk file found missing or not matching the manifest (``_verify_zarr_file``)."""
        if e.kind == "missing":
            return StoreFormatError(f"{url}: missing chunk {idx} of array '{name}'; the store is damaged: run "
                                    f"`mmloader validate {self.url}` and prepare it again")
        return self._damaged_chunk(url, name, idx, e.detail)

    def _chunk_error(self, rel: str, name: str, arr: zarr.Array, idx: tuple[int, ...], e: BaseException) -> StoreFormatError:
        self._check_not_replaced()
        detail = "crc32c checksum mismatch" if "checksum" in str(e) else f"{type(e).__name__}: {e}"
        return self._damaged_chunk(join(self.url, rel, name, self._chunk_key(arr, idx)), name, idx, detail)

    @staticmethod
    def _chunk_region(arr: zarr.Array, idx: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, arr.chunks, arr.shape))

    def _read_chunk(self, rel: str, name: str, arr: zarr.Array | ArrayLayout, idx: tuple[int, ...]) -> np.ndarray:
        if isinstance(arr, ArrayLayout):
            return self._decode_chunk(rel, name, arr, idx)
        try:
            return arr[self._chunk_region(arr, idx)]
        except ZarrFileError as e:  # missing, or its sha256 differs (_VerifiedStore)
            raise self._unreadable_chunk(join(self.url, rel, name, self._chunk_key(arr, idx)), name, idx, e) from None
        except StoreFormatError:
            raise
        except Exception as e:  # codec errors (crc32c, zstd) come as ValueError / RuntimeError
            raise self._chunk_error(rel, name, arr, idx, e) from None

    # -- direct chunk reads (mmloader.store.chunks): the store's own arrays without Zarr's event loop ---------
    def _read_file(self, rel: str) -> bytes | None:
        """The bytes of the store's file ``rel``, None when it does not exist."""
        path = join(self.path, rel)
        try:
            if self._local:
                with open(path, "rb") as f:
                    return f.read()
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def _checked_file(self, rel: str) -> bytes | None:
        """``_read_file`` checked against the manifest like every file Zarr reads (``_verify_zarr_file``)."""
        raw = self._read_file(rel)
        self._verify_zarr_file(rel, _Bytes(raw) if raw is not None else None, whole=True)
        return raw

    def _decode_chunk(self, rel: str, name: str, layout: ArrayLayout, idx: tuple[int, ...]) -> np.ndarray:
        key = f"{rel}/{name}/{layout.key(idx)}"
        url = join(self.url, key)
        try:
            raw = self._checked_file(key)
        except ZarrFileError as e:
            raise self._unreadable_chunk(url, name, idx, e) from None
        assert raw is not None  # a listed chunk that is absent raised above
        try:
            return decode_chunk(raw, layout, idx)
        except ChunkDecodeError as e:
            self._check_not_replaced()
            raise self._damaged_chunk(url, name, idx, e.detail) from None

    def _decode_whole(self, rel: str, name: str, layout: ArrayLayout) -> np.ndarray:
        out = np.empty(layout.shape, dtype=layout.dtype)
        for idx in np.ndindex(*layout.grid_shape):
            out[layout.region(idx)] = self._decode_chunk(rel, name, layout, idx)
        return out

    def _fast_group(self, rel: str, names: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, ArrayLayout]] | None:
        """(group attributes, array layouts) of a group whose arrays ``chunks`` decodes, checked as ``_group``
        checks (manifest, generation); None when Zarr must read it (another codec, or a file missing: Zarr's
        path then raises the error that names it)."""
        raw = self._checked_file(f"{rel}/zarr.json")
        if raw is None:
            return None
        try:
            attrs = json.loads(raw).get("attributes") or {}
        except (ValueError, AttributeError):
            return None
        if attrs.get("generation") != self.generation:
            raise self._replaced(f". {join(self.url, rel)} is of generation {attrs.get('generation')!r}, the "
                                 f"manifest opened is of {self.generation!r}")
        layouts = {}
        for name in names:
            meta = self._checked_file(f"{rel}/{name}/zarr.json")
            layout = ArrayLayout.parse(meta) if meta is not None else None
            if layout is None:
                return None
            layouts[name] = layout
        return attrs, layouts

    def _read_whole(self, rel: str, name: str, arr: zarr.Array | ArrayLayout) -> np.ndarray:
        """A whole array; on a decode error, the chunk that fails is found and named."""
        if isinstance(arr, ArrayLayout):
            return self._decode_whole(rel, name, arr)
        try:
            out = arr[...]
        except Exception as e:
            for idx in np.ndindex(*arr.cdata_shape):
                self._read_chunk(rel, name, arr, idx)
            raise StoreFormatError(f"{join(self.url, rel, name)}: unreadable ({type(e).__name__}: {e})") from None
        return out

    def timeseries_group(self, recording_id: str, stream: str) -> zarr.Group:
        """The Zarr group of a time series, for sliced reads (``group['data'][i:j]``), checked when opened.

        Reads through the returned group are checked chunk by chunk (present, sha256 against the manifest,
        crc32c); ``timeseries_slice`` and ``read_timeseries`` also check that the store was not replaced.
        """
        return self._open_group(self.stream_row(recording_id, stream)["uri"], TIMESERIES_ARRAYS)[0]

    def read_timeseries(self, recording_id: str, stream: str) -> TimeSeries:
        """A whole time series in memory."""
        rel = self.stream_row(recording_id, stream)["uri"]
        g, arrays = self._open_group(rel, TIMESERIES_ARRAYS)
        t_ns = self._read_whole(rel, "t_ns", arrays["t_ns"])
        data = self._read_whole(rel, "data", arrays["data"])
        self._check_not_replaced()
        return TimeSeries(
            t_ns=t_ns,
            data=data,
            channels=tuple(g.attrs["channels"]),
            units=tuple(g.attrs["units"]),
            rate_hz=float(g.attrs["rate_hz"]),
        )

    def timeseries_slice(self, recording_id: str, stream: str, t_from_ns: int, t_to_ns: int) -> tuple[np.ndarray, np.ndarray]:
        """The samples with ``t_from_ns <= t <= t_to_ns`` plus one on each side (for interpolation).

        Reads only the chunks that hold them, found through ``t_coarse``; decoded chunks are kept in a
        per-process LRU bounded in bytes (``chunk_cache_mb()``, 1 GiB by default), so neighbouring windows, and
        shuffled epochs over data that fits, cost no further reads. The arrays returned may be read-only views of
        those cached chunks: copy them to change them.
        """
        coarse, n_chunks = self._timeseries_handle(recording_id, stream)[1:3]
        c0 = max(int(np.searchsorted(coarse, t_from_ns, side="right")) - 1, 0)
        c1 = min(int(np.searchsorted(coarse, t_to_ns, side="right")), n_chunks)
        parts = [self._chunk(recording_id, stream, c) for c in range(c0, c1)]
        t = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
        x = parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts])
        a = max(int(np.searchsorted(t, t_from_ns, side="left")) - 1, 0)
        b = min(int(np.searchsorted(t, t_to_ns, side="right")) + 1, t.shape[0])
        return t[a:b], x[a:b]

    def regular_run(self, recording_id: str, stream: str, t_start_ns: int, n: int, period_ns: int) -> np.ndarray | None:
        """The ``n`` samples ``(n, C)`` at exactly ``t_start_ns + k * period_ns`` (k < n), when the stream has them
        consecutively and the interval after the last one is also ``period_ns`` (or the stream ends there); None
        otherwise. The rows are those ``timeseries_slice`` returns for these times: a window on a grid that is
        the stream's own clock is a copy of its rows (``mmloader.windows.resample``'s exact case)."""
        coarse, n_chunks = self._timeseries_handle(recording_id, stream)[1:3]
        c = int(np.searchsorted(coarse, t_start_ns, side="right")) - 1
        if c < 0 or n < 1 or period_ns <= 0:
            return None
        t, x, per = self._chunk(recording_id, stream, c)
        off = t_start_ns - int(t[0])
        if per not in (period_ns, -1) or off % period_ns or off // period_ns >= t.shape[0]:
            return None
        p, parts, got = off // period_ns, [], 0  # got: samples of the run (and the one after it) found so far
        while True:
            k = min(t.shape[0] - p, n + 1 - got)
            parts.append(x[p:p + k])
            got += k
            expect = int(t[p + k - 1]) + period_ns
            c += 1
            if got > n or c >= n_chunks:  # the run and the sample after it, or the stream's end
                break
            t, x, per = self._chunk(recording_id, stream, c)
            if per not in (period_ns, -1) or int(t[0]) != expect:
                return None
            p = 0
        if got < n:
            return None
        rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return rows[:n]

    def regular_runs(self, recording_id: str, stream: str, t_starts: np.ndarray, n: int,
                     period_ns: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``regular_run`` for many windows of one recording at once, each chunk looked up once: ``(rows, starts)``
        with ``rows`` the stream's samples over the windows' span, channels first, ``(C, L)`` float32 and
        contiguous (as a batch's ``(B, C, T)`` windows want them), and ``starts[j]`` the column of window ``j``'s
        first sample — ``rows[:, s:s + n]`` is ``regular_run(...).T`` exactly, cast to float32 — or -1 where
        this span does not settle window ``j`` (``regular_run`` decides it alone). None when the chunks over the
        span are not one gapless run at ``period_ns`` (every window decided alone)."""
        t_starts = np.asarray(t_starts, dtype=np.int64)
        if n < 1 or period_ns <= 0 or t_starts.size == 0:
            return None
        coarse, n_chunks = self._timeseries_handle(recording_id, stream)[1:3]
        c0 = int(np.searchsorted(coarse, int(t_starts.min()), side="right")) - 1
        c1 = min(int(np.searchsorted(coarse, int(t_starts.max()) + n * period_ns, side="right")) - 1, n_chunks - 1)
        if c0 < 0:
            return None
        parts, first, expect = [], 0, None
        for c in range(c0, c1 + 1):
            t, x, per = self._chunk(recording_id, stream, c)
            if per not in (period_ns, -1) or (expect is not None and int(t[0]) != expect):
                return None
            first = int(t[0]) if expect is None else first
            parts.append(x)
            expect = int(t[-1]) + period_ns
        off = t_starts - first
        starts = off // period_ns
        total = sum(p.shape[0] for p in parts)
        after = 0 if c1 == n_chunks - 1 else 1  # the sample after each run must be there, unless the stream ends
        ok = (off >= 0) & (off % period_ns == 0) & (starts + n + after <= total)
        if not ok.any():
            return None
        lo, hi = int(starts[ok].min()), int(starts[ok].max()) + n  # only the rows the runs cover
        rows = np.empty((parts[0].shape[1], hi - lo), dtype=np.float32)
        at = 0
        for x in parts:  # transposed (and cast) part by part: one pass over the span, no concatenation
            a, b = max(lo - at, 0), min(hi - at, x.shape[0])
            if a < b:
                rows[:, at + a - lo: at + b - lo] = x[a:b].T
            at += x.shape[0]
        return rows, np.where(ok, starts - lo, -1)

    def _chunk(self, recording_id: str, stream: str, c: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Chunk ``c`` of a time series: ``(t_ns, data, period)`` (``_period`` of its times), cached."""
        def load() -> tuple[np.ndarray, np.ndarray, int]:
            coarse, _, t_arr, data_arr, rows, rel, periods = self._timeseries_handle(recording_id, stream)[1:8]
            # a chunk deleted since the handle was opened raises (_VerifiedStore), never reads as fill values
            x = self._read_chunk(rel, "data", data_arr, (c, 0))
            per = int(periods[c]) if periods is not None else 0
            if per > 0:  # regular: its times are t_coarse[c] + k * period, exactly what t_ns holds
                t = int(coarse[c]) + np.arange(x.shape[0], dtype=np.int64) * per
            else:
                t = self._read_chunk(rel, "t_ns", t_arr, (c,))
                per = _period(t)
            self._check_not_replaced()  # local: the store was not replaced underneath (root renamed) meanwhile
            t.flags.writeable = False  # shared by every later read in this process: never changed in place
            x.flags.writeable = False
            return t, x, per

        return self._chunks.get((recording_id, stream, c), load)

    def _timeseries_handle(self, recording_id: str, stream: str):
        """(group attributes, t_coarse, number of chunks, t_ns array, data array, rows per chunk, group path,
        t_period or None), cached. The arrays are ``ArrayLayout``s (read directly, ``mmloader.store.chunks``) when
        the store's own codec pipeline is found, else Zarr arrays. ``t_period`` (per chunk: its exact sample
        interval, 0 or -1 when it has none) is read when the store has it (written since mmloader 0.1) and its
        arrays are read directly."""
        def load():
            rel = self.stream_row(recording_id, stream)["uri"]
            fast = self._fast_group(rel, TIMESERIES_ARRAYS)
            if fast is not None:
                attrs, arrays = fast
                # local: t_ns / data chunks are checked as each is loaded (_chunk); elsewhere all, by one listing
                self._check_chunks_present(rel, {"t_coarse": arrays["t_coarse"]} if self._local else arrays)
            else:
                g, arrays = self._open_group(rel, TIMESERIES_ARRAYS, ("t_coarse",) if self._local else None)
                attrs = dict(g.attrs)
            coarse = self._read_whole(rel, "t_coarse", arrays["t_coarse"])
            periods = self._chunk_periods(rel, len(coarse)) if fast is not None else None
            return (attrs, coarse, len(coarse), arrays["t_ns"], arrays["data"], int(attrs["chunk_rows"]), rel,
                    periods)

        return self._handles.get((recording_id, stream), load)

    def _chunk_periods(self, rel: str, n_chunks: int) -> np.ndarray | None:
        """The group's ``t_period`` (one entry per chunk), None when the store has none (written before it)."""
        if f"{rel}/t_period/zarr.json" not in self.manifest["files"]:
            return None
        layout = ArrayLayout.parse(self._checked_file(f"{rel}/t_period/zarr.json") or b"")
        if layout is None:
            return None
        periods = self._read_whole(rel, "t_period", layout)
        if periods.shape != (n_chunks,):
            raise StoreFormatError(f"{join(self.url, rel, 't_period')}: {periods.shape[0]} entries, expected one "
                                   f"per chunk ({n_chunks})")
        return periods

    def video_index(self, recording_id: str, stream: str = "video") -> tuple[np.ndarray, np.ndarray]:
        """``(pts_ns, keyframe)`` of a video stream."""
        rel = self.stream_row(recording_id, stream)["index_uri"]
        _, arrays = self._open_group(rel, VIDEO_INDEX_ARRAYS)
        out = self._read_whole(rel, "pts_ns", arrays["pts_ns"]), self._read_whole(rel, "keyframe", arrays["keyframe"])
        self._check_not_replaced()
        return out

    # -- validation ------------------------------------------------------------------------------
    def validate(self) -> list[str]:
        """Check the whole store deeply; returns a list of problems (empty when the store is intact).

        Every file listed in the manifest: present, with its recorded size and (all but ``media/``) sha256.
        Every Zarr group (those in the manifest and those ``streams`` names): its generation, every chunk its
        arrays' shapes imply present, and every chunk decoded (crc32c). Every events table: readable, with the
        schema's columns. Every video's media file: its recorded size and content hash (``media.verify_media``).
        One problem per file, each naming it.
        """
        problems: dict[str, str] = {}

        def add(url: str, msg: str) -> None:
            problems.setdefault(url, msg)

        self._check_not_replaced()
        files = self.manifest["files"]
        for rel, entry in files.items():
            url, p = join(self.url, rel), join(self.path, rel)
            try:
                size = int(self.fs.info(p)["size"])
            except FileNotFoundError:
                add(url, f"{url}: missing")
                continue
            if size != entry["size"]:
                add(url, f"{url}: size {size} bytes, expected {entry['size']}")
                continue
            if "sha256" in entry:
                h = hashlib.sha256()
                with self.fs.open(p, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                if h.hexdigest() != entry["sha256"]:
                    buf = read_arrow_buffer(p, self.fs) if rel.endswith(".parquet") else None
                    add(url, self._file_mismatch(url, h.hexdigest(), size, entry, buf))
            elif has_sha256(rel):
                add(url, f"{url}: no sha256 in {MANIFEST}'s 'files'")
        groups = {rel[: rel.index(".zarr/") + len(".zarr")] for rel in files if ".zarr/" in rel}
        for row in self.streams.to_pylist():
            if row["kind"] == "timeseries":
                groups.add(row["uri"])
            if row.get("index_uri"):
                groups.add(row["index_uri"])
        for rel in sorted(groups):
            try:
                g = self._group(rel)
                arrays = dict(g.arrays())
            except StoreFormatError as e:  # a zarr.json that fails its check is named (and counted) once
                add(getattr(e, "url", join(self.url, rel)), str(e))
                continue
            absent = self._missing_chunks(rel, arrays)
            missing = {key for key, _, _ in absent}
            for key, name, idx in absent:
                add(join(self.url, key), f"{join(self.url, key)}: missing chunk {idx} of array '{name}'")
            for name, arr in sorted(arrays.items()):
                for idx in np.ndindex(*arr.cdata_shape):
                    key = f"{rel}/{name}/{self._chunk_key(arr, idx)}"
                    if key in missing:
                        continue
                    try:
                        self._read_chunk(rel, name, arr, idx)
                    except StoreFormatError as e:
                        add(join(self.url, key), str(e))
        for name in self.event_names:
            try:
                self.events(name)
            except StoreFormatError as e:
                add(join(self.url, self.manifest["events"][name]), str(e))
        from ..video.probe import check_store_media

        for msg in check_store_media(self):  # every video's file against its size and content hash
            problems.setdefault(msg, msg)
        return list(problems.values())

    @cached_property
    def modalities(self) -> list[str]:
        """Stream names present in at least one recording."""
        return sorted(set(self.streams["stream"].to_pylist()))


def _reopen(url: str, storage_options: dict[str, Any], generation: str | None = None) -> Store:
    store = Store(url, **storage_options)
    if generation is not None and store.generation != generation:
        raise store._replaced(f". Generation {generation!r} when pickled, {store.generation!r} now")
    return store
