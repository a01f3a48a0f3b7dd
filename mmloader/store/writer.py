"""Writing a store atomically.

A store is published in one step: on a local filesystem everything is written under a hidden temporary
sibling (``.NAME.partial-<random>``) and renamed into place; on other filesystems (``memory://``, ``s3://``),
where directories cannot be renamed atomically, the files are written in place and ``mmloader.json`` is
written *last*. Either way a store without its manifest is refused by the reader, and a writer that fails
removes what it wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from .. import __version__
from ..errors import StoreFormatError
from ..fsutil import get_fs, is_local, join, normalize_url
from ..schema import FORMAT, FORMAT_VERSION, conform, load_schema, table_file

MANIFEST = "mmloader.json"
TIMESERIES_CHUNK_ROWS = 4096


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
        self._done = False
        if self.fs.exists(self.path):
            if not overwrite:
                raise FileExistsError(f"{self.url}: already exists (pass overwrite=True / --overwrite to replace it)")
        self._overwrite = overwrite
        self._local = is_local(self.fs)
        if self._local:
            parent, name = os.path.split(self.path)
            os.makedirs(parent, exist_ok=True)
            self.work_path = os.path.join(parent, f".{name}.partial-{uuid.uuid4().hex[:8]}")
            os.makedirs(self.work_path)
            self.work_url = self.work_path
        else:
            if self.fs.exists(self.path):
                self.fs.rm(self.path, recursive=True)
            self.fs.makedirs(self.path, exist_ok=True)
            self.work_path = self.path
            self.work_url = self.url

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
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
        rel = load_schema()["timeseries"]["path_pattern"].format(recording_id=recording_id, stream=stream)
        group = zarr.open_group(self._url(rel), mode="w", storage_options=self._zarr_options())
        n = max(1, t_ns.shape[0])
        rows = min(chunk_rows, n)
        group.create_array("t_ns", data=t_ns, chunks=(rows,))
        group.create_array("t_coarse", data=t_ns[::rows].copy())
        group.create_array("data", data=data.astype(np.float32, copy=False), chunks=(rows, data.shape[1]))
        group.attrs.update(
            {"channels": list(channels), "units": list(units), "rate_hz": float(rate_hz), "chunk_rows": rows}
        )
        return rel

    def write_video_index(self, recording_id: str, stream: str, pts_ns: np.ndarray, keyframe: np.ndarray) -> str:
        """Write the per-frame pts index (ns, sorted) and keyframe flags of a video stream."""
        rel = load_schema()["video_index"]["path_pattern"].format(recording_id=recording_id, stream=stream)
        group = zarr.open_group(self._url(rel), mode="w", storage_options=self._zarr_options())
        group.create_array("pts_ns", data=np.asarray(pts_ns, dtype=np.int64))
        group.create_array("keyframe", data=np.asarray(keyframe, dtype=bool))
        return rel

    def write_table(self, kind: str, table: pa.Table) -> str:
        """Write ``recordings``, ``streams`` or ``gaps``, cast to (and checked against) the schema."""
        rel = table_file(kind)
        table = conform(table, kind, where=f"{rel} (being written)")
        self._write_parquet(rel, table)
        self._tables[kind] = rel
        return rel

    def write_events(self, name: str, table: pa.Table) -> str:
        """Write an events table (narrations, summaries, labels...) as ``events/{name}.parquet``."""
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
        with self.fs.open(path, "wb") as f:
            f.write(memoryview(sink.getvalue()))

    def _zarr_options(self) -> dict[str, Any] | None:
        return None if self._local else (self.storage_options or {})

    # -- publish ---------------------------------------------------------------------------------
    def commit(self) -> str:
        """Write the manifest last and publish the store; returns its URL."""
        if self._done:
            return self.url
        missing = {"recordings", "streams", "gaps"} - set(self._tables)
        if missing:
            self.abort()
            raise StoreFormatError(f"{self.url}: cannot commit a store without the tables {sorted(missing)}")
        files = {}
        for p in self.fs.find(self.work_path, detail=True).values():
            rel = p["name"][len(self.fs._strip_protocol(self.work_path)):].lstrip("/")
            files[rel] = int(p["size"])
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "created_by": f"mmloader {__version__}",
            "source_fingerprint": self.source_fingerprint,
            "options": self.options,
            "tables": dict(self._tables),
            "events": dict(self._events),
            "files": dict(sorted(files.items())),
        }
        with self.fs.open(join(self.work_path, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, default=_json_default)
        if self._local:
            if os.path.exists(self.path):
                trash = f"{self.work_path}.old"
                os.rename(self.path, trash)
                os.rename(self.work_path, self.path)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(self.work_path, self.path)
        self._done = True
        return self.url

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
