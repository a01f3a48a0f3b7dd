"""The rows a recipe adds to a store's tables, and rows → Arrow tables.

A recipe builds one ``RecordingRows`` per source recording (its ``recordings`` row, ``streams`` rows, ``gaps``
rows, event rows and report entry); ``StoreRows`` gathers them and writes the tables. Column names and types
come from the store schema (``mmloader.store.schema``); times are int64 ns on the recording's clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import pyarrow as pa

from ..store.schema import load_schema, table_schema

if TYPE_CHECKING:
    from ..store.writer import StoreWriter
    from ..video.probe import MediaIdentity, VideoInfo

Row = dict[str, Any]


def table(kind: str, rows: Iterable[Row]) -> pa.Table:
    """``recordings``, ``streams`` or ``gaps`` rows as a table of exactly the schema's columns (absent keys → null)."""
    schema = table_schema(kind)
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def event_row(recording_id: str, t_start_ns: int, t_end_ns: int, text: str, *, kind: str, source: str, uid: str,
              text_raw: str | None = None, **extra: Any) -> Row:
    """One row of an events table (times in ns on the recording's clock; ``text_raw`` defaults to ``text``);
    ``extra`` columns (e.g. ``confidence``) follow the schema's in the table."""
    return {"recording_id": recording_id, "t_start_ns": t_start_ns, "t_end_ns": t_end_ns, "text": text,
            "text_raw": text if text_raw is None else text_raw, "kind": kind, "source": source, "uid": uid, **extra}


def events_table(rows: Sequence[Row], name: str = "events", error: type[Exception] = ValueError) -> pa.Table:
    """Event rows as a table: the schema's columns first, then every extra key the rows carry, sorted by name
    (missing extras → null). Extra columns of mixed types raise ``error`` naming the table ``name``."""
    base = table_schema("events").names
    extra = sorted({k for r in rows for k in r} - set(base))
    try:
        return pa.Table.from_pylist([{k: r.get(k) for k in [*base, *extra]} for r in rows])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise error(f"events {name!r}: the extra columns {extra} have mixed types ({e})") from None


def events_uri(name: str) -> str:
    """Where the events table ``name`` lives inside a store (``events/<name>.parquet``)."""
    return load_schema()["events"]["file_pattern"].format(name=name)


@dataclass
class RecordingRows:
    """Everything one source recording adds to a store: table rows, event rows and its prepare-report entry.

    The ``add_*`` methods append a ``streams`` row (and its ``gaps`` rows) and return it; streams appear in the
    table in the order they were added.
    """

    recording_id: str
    streams: list[Row] = field(default_factory=list)
    gaps: list[Row] = field(default_factory=list)
    events: dict[str, list[Row]] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    recording: Row | None = None

    def add_timeseries(self, stream: str, uri: str, t_ns: np.ndarray, rate_hz: float, channels: list[str],
                       units: list[str], gaps: Iterable[tuple[int, int]] = ()) -> Row:
        """A ``timeseries`` row for the Zarr group at ``uri`` holding ``t_ns`` (>= 1 sample), and its gaps."""
        row = {"recording_id": self.recording_id, "stream": stream, "kind": "timeseries", "uri": uri,
               "t_start_ns": int(t_ns[0]), "t_end_ns": int(t_ns[-1]), "n_samples": int(t_ns.size),
               "rate_hz": rate_hz, "channels": channels, "units": units}
        self.streams.append(row)
        self.add_gaps(stream, gaps)
        return row

    def write_timeseries(self, writer: "StoreWriter", stream: str, t_ns: np.ndarray, data: np.ndarray,
                         channels: list[str], units: list[str], rate_hz: float,
                         gaps: Iterable[tuple[int, int]] = ()) -> Row:
        """Write the arrays (``t_ns (N,) int64`` strictly increasing, ``data (N, C)``) through ``writer`` and
        add their ``timeseries`` row and gaps."""
        uri = writer.write_timeseries(self.recording_id, stream, t_ns, data, channels, units, rate_hz=rate_hz)
        return self.add_timeseries(stream, uri, t_ns, rate_hz, channels, units, gaps)

    def add_gaps(self, stream: str, gaps: Iterable[tuple[int, int]]) -> None:
        """``gaps`` rows of ``stream``: ``(last sample before, first sample after)`` in ns."""
        self.gaps.extend({"recording_id": self.recording_id, "stream": stream, "t_start_ns": a, "t_end_ns": b}
                         for a, b in gaps)

    def add_video(self, stream: str, uri: str, index_uri: str, info: "VideoInfo", *, rate_hz: float | None = None,
                  identity: "MediaIdentity | None" = None) -> Row:
        """A ``video`` row: the media at ``uri``, its pts index at ``index_uri``; ``rate_hz`` defaults to the
        probed fps; ``identity`` (size, mtime, hash) is checked when a reader opens the file."""
        row = {"recording_id": self.recording_id, "stream": stream, "kind": "video", "uri": uri,
               "index_uri": index_uri, "t_start_ns": int(info.pts_ns[0]), "t_end_ns": int(info.pts_ns[-1]),
               "n_samples": info.num_frames, "rate_hz": info.fps if rate_hz is None else rate_hz,
               "width": info.width, "height": info.height, "codec": info.codec,
               **(identity.columns() if identity is not None else {})}
        self.streams.append(row)
        return row

    def write_video(self, writer: "StoreWriter", stream: str, uri: str, info: "VideoInfo", *,
                    rate_hz: float | None = None, identity: "MediaIdentity | None" = None) -> Row:
        """Write the pts index of a probed video through ``writer`` and add its ``video`` row."""
        index_uri = writer.write_video_index(self.recording_id, stream, info.pts_ns, info.keyframe)
        return self.add_video(stream, uri, index_uri, info, rate_hz=rate_hz, identity=identity)

    def add_events(self, name: str, rows: list[Row]) -> Row | None:
        """Keep ``rows`` for the events table ``name``; with at least one row, also its ``events`` streams row
        (the span of the rows), which is returned. An empty list adds the name with no stream row."""
        self.events[name] = rows
        if not rows:
            return None
        row = {"recording_id": self.recording_id, "stream": name, "kind": "events", "uri": events_uri(name),
               "t_start_ns": min(r["t_start_ns"] for r in rows), "t_end_ns": max(r["t_end_ns"] for r in rows),
               "n_samples": len(rows)}
        self.streams.append(row)
        return row

    def set_recording(self, dataset: str, split: str | None, duration_ns: int, modalities: list[str],
                      meta_json: str | None) -> Row:
        """The ``recordings`` row (``meta_json``: a JSON text, see ``meta_json``)."""
        self.recording = {"recording_id": self.recording_id, "dataset": dataset, "split": split,
                          "duration_ns": duration_ns, "modalities": modalities, "meta_json": meta_json}
        return self.recording


def video_report(info: "VideoInfo") -> dict[str, Any]:
    """A probed video's entry in the prepare report: frames, fps, ``[width, height]``, codec, first pts (s)."""
    return {"frames": info.num_frames, "fps": info.fps, "size": [info.width, info.height], "codec": info.codec,
            "first_pts_sec": info.pts_ns[0] / 1e9}


def meta_json(meta: Any, **dumps: Any) -> str:
    """A recording's metadata as the ``meta_json`` text: keys sorted."""
    return json.dumps(meta, sort_keys=True, **dumps)


class StoreRows:
    """The rows of every recording prepared so far; ``write`` writes the store's tables from them.

    ``event_names`` fixes the order of the first events tables (others follow in the order they appear);
    ``error`` is raised for an events table whose extra columns have mixed types.
    """

    def __init__(self, event_names: Sequence[str] = (), error: type[Exception] = ValueError):
        self.error = error
        self.recordings: list[Row] = []
        self.streams: list[Row] = []
        self.gaps: list[Row] = []
        self.events: dict[str, list[Row]] = {name: [] for name in event_names}

    def add(self, rec: RecordingRows) -> None:
        if rec.recording is None:
            raise ValueError(f"recording {rec.recording_id!r}: no recordings row (call set_recording)")
        self.recordings.append(rec.recording)
        self.streams.extend(rec.streams)
        self.gaps.extend(rec.gaps)
        for name, rows in rec.events.items():
            self.events.setdefault(name, []).extend(rows)

    def __len__(self) -> int:
        return len(self.recordings)

    def write(self, writer: "StoreWriter") -> None:
        """The ``recordings``, ``streams`` and ``gaps`` tables, and every events table that has rows."""
        writer.write_table("recordings", table("recordings", self.recordings))
        writer.write_table("streams", table("streams", self.streams))
        writer.write_table("gaps", table("gaps", self.gaps))
        for name, rows in self.events.items():
            if rows:
                writer.write_events(name, events_table(rows, name, self.error))


__all__ = ["RecordingRows", "StoreRows", "event_row", "events_table", "events_uri", "meta_json", "table", "video_report"]
