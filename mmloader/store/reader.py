"""Opening and validating a prepared store on any fsspec URL."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from ..errors import StoreFormatError
from ..fsutil import get_fs, is_local, join, normalize_url, read_arrow_buffer
from ..lru import LRU
from ..schema import check_manifest, check_table, load_schema
from .writer import MANIFEST

HANDLE_CACHE = 64  # open time-series groups kept per process
CHUNK_CACHE = 64  # decoded time-series chunks kept per process (4096 rows x C float32 each)


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

    Opening checks the manifest (format and version), that the tables it lists exist, and that their
    columns have the schema's types. ``validate()`` additionally checks every file's presence and size.
    """

    def __init__(self, url: str | os.PathLike, **storage_options: Any):
        self.url = normalize_url(url)
        self.storage_options = storage_options
        self.fs, self.path = get_fs(self.url, **storage_options)
        where = join(self.url, MANIFEST)
        if not self.fs.exists(join(self.path, MANIFEST)):
            if self.fs.exists(self.path):
                raise StoreFormatError(
                    f"{where}: missing. {self.url} is not an mmloader store, or its prepare was interrupted; "
                    "prepare it again (mmloader prepare DATASET SRC DST)"
                )
            raise StoreFormatError(f"{self.url}: no such store")
        try:
            with self.fs.open(join(self.path, MANIFEST), "r") as f:
                manifest = json.load(f)
        except json.JSONDecodeError as e:
            raise StoreFormatError(f"{where}: not valid JSON ({e})") from None
        check_manifest(manifest, where)
        self.manifest: dict[str, Any] = manifest
        self.recordings = self._read_table("recordings")
        self.streams = self._read_table("streams")
        self.gaps = self._read_table("gaps")
        self._handles: LRU = LRU(HANDLE_CACHE)
        self._chunks: LRU = LRU(CHUNK_CACHE)
        self._stream_rows: dict[tuple[str, str], dict[str, Any]] | None = None

    def __reduce__(self):
        # Workers reopen the store from its URL: no tables, handles or file objects are pickled.
        return (_reopen, (self.url, self.storage_options))

    # -- tables ----------------------------------------------------------------------------------
    def _read_parquet(self, rel: str) -> pa.Table:
        where = join(self.url, rel)
        if not self.fs.exists(join(self.path, rel)):
            raise StoreFormatError(f"{where}: missing (listed in {MANIFEST})")
        try:
            return pq.read_table(pa.BufferReader(read_arrow_buffer(join(self.path, rel), self.fs)))
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreFormatError(f"{where}: not a readable Parquet file ({e})") from None

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
        if not self.fs.exists(join(self.path, rel)):
            return {}
        with self.fs.open(join(self.path, rel), "r") as f:
            return json.load(f)

    # -- arrays ----------------------------------------------------------------------------------
    def _group(self, rel: str) -> zarr.Group:
        where = join(self.url, rel)
        try:
            opts = None if is_local(self.fs) else (self.storage_options or {})
            return zarr.open_group(join(self.url, rel), mode="r", storage_options=opts)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise StoreFormatError(f"{where}: missing or not a Zarr group ({e})") from None

    def timeseries_group(self, recording_id: str, stream: str) -> zarr.Group:
        """The Zarr group of a time series, for sliced reads (``group['data'][i:j]``)."""
        return self._group(self.stream_row(recording_id, stream)["uri"])

    def read_timeseries(self, recording_id: str, stream: str) -> TimeSeries:
        """A whole time series in memory."""
        g = self.timeseries_group(recording_id, stream)
        return TimeSeries(
            t_ns=g["t_ns"][:],
            data=g["data"][:],
            channels=tuple(g.attrs["channels"]),
            units=tuple(g.attrs["units"]),
            rate_hz=float(g.attrs["rate_hz"]),
        )

    def timeseries_slice(self, recording_id: str, stream: str, t_from_ns: int, t_to_ns: int) -> tuple[np.ndarray, np.ndarray]:
        """The samples with ``t_from_ns <= t <= t_to_ns`` plus one on each side (for interpolation).

        Reads only the chunks that hold them, found through ``t_coarse``; decoded chunks are kept in a
        small per-process LRU (``CHUNK_CACHE`` chunks), so neighbouring windows cost no further reads.
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

    def _chunk(self, recording_id: str, stream: str, c: int) -> tuple[np.ndarray, np.ndarray]:
        def load() -> tuple[np.ndarray, np.ndarray]:
            t_arr, data_arr, rows = self._timeseries_handle(recording_id, stream)[3:6]
            return t_arr[c * rows:(c + 1) * rows], data_arr[c * rows:(c + 1) * rows]

        return self._chunks.get((recording_id, stream, c), load)

    def _timeseries_handle(self, recording_id: str, stream: str):
        """(group, t_coarse, number of chunks, t_ns array, data array, rows per chunk), cached."""
        def load():
            g = self.timeseries_group(recording_id, stream)
            coarse = g["t_coarse"][:]
            return (g, coarse, len(coarse), g["t_ns"], g["data"], int(g.attrs["chunk_rows"]))

        return self._handles.get((recording_id, stream), load)

    def video_index(self, recording_id: str, stream: str = "video") -> tuple[np.ndarray, np.ndarray]:
        """``(pts_ns, keyframe)`` of a video stream."""
        row = self.stream_row(recording_id, stream)
        g = self._group(row["index_uri"])
        return g["pts_ns"][:], g["keyframe"][:]

    # -- validation ------------------------------------------------------------------------------
    def validate(self) -> list[str]:
        """Check every file listed in the manifest (present, same size) and every events table.

        Returns a list of problems (empty when the store is intact).
        """
        problems = []
        for rel, size in self.manifest["files"].items():
            p = join(self.path, rel)
            if not self.fs.exists(p):
                problems.append(f"{join(self.url, rel)}: missing")
                continue
            found = self.fs.size(p)
            if found != size:
                problems.append(f"{join(self.url, rel)}: size {found} bytes, expected {size}")
        for name in self.event_names:
            try:
                self.events(name)
            except StoreFormatError as e:
                problems.append(str(e))
        return problems

    @cached_property
    def modalities(self) -> list[str]:
        """Stream names present in at least one recording."""
        return sorted(set(self.streams["stream"].to_pylist()))


def _reopen(url: str, storage_options: dict[str, Any]) -> Store:
    return Store(url, **storage_options)
