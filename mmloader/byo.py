"""Bring your own dataset: write a store from plain arrays, media files and label lists.

>>> import numpy as np
>>> from mmloader.byo import Recording, TimeSeriesInput, write_store
>>> t_ns = np.arange(3000, dtype=np.int64) * 20_000_000            # 50 Hz, ns on the recording's clock
>>> acc = np.random.randn(3000, 3).astype(np.float32)
>>> url = write_store("/data/wrist-store", dataset="wrist", recordings=[
...     Recording(id="subject1-day1", split="train",
...               timeseries={"wrist": TimeSeriesInput(t_ns, acc, ["acc_x", "acc_y", "acc_z"], ["m/s^2"] * 3)},
...               events={"labels": [(0, 10_000_000_000, "walking")]}),
... ])

Time is int64 nanoseconds on each recording's own clock (any origin). ``write_store`` validates every
input (errors name the recording and the stream), measures rates, finds gaps (periods longer than
``gap_factor`` × the median period; windows mask them, never fill them), probes videos (their pts index is
stored; the media stays where it is) and writes the recordings / streams / gaps tables for you, atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

import numpy as np
import pyarrow as pa

from .errors import MMLoaderError
from .fsutil import normalize_url
from .media import probe_video
from .schema import table_schema
from .store.writer import StoreWriter

NS = 1_000_000_000
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
EventRow = Union[Sequence[Any], Mapping[str, Any]]


class InputError(MMLoaderError, ValueError):
    """An input given to ``write_store`` is malformed; the message names the recording and the stream."""


@dataclass(frozen=True)
class TimeSeriesInput:
    """One time series: ``t_ns (N,)`` integer ns on the recording's clock, strictly increasing;
    ``data (N, C)`` numeric, finite; one channel name and unit per column. ``rate_hz`` is the nominal
    rate (None: measured from the median period)."""

    t_ns: np.ndarray
    data: np.ndarray
    channels: Sequence[str]
    units: Sequence[str]
    rate_hz: float | None = None


@dataclass(frozen=True)
class Recording:
    """One continuous capture and its streams (stream name = modality name, e.g. ``imu``, ``video``).

    ``timeseries``: name → TimeSeriesInput. ``videos``: name → path or fsspec URL of a media file (probed;
    frame times are its pts, which must be on the same clock as the time series). ``events``: name →
    rows, each ``(t_start_ns, t_end_ns, text)`` or a dict with ``t_start_ns``, ``t_end_ns``, ``text`` and
    optionally ``text_raw``, ``kind``, ``source``, ``uid``. ``meta``: JSON-serialisable, kept as meta_json.
    ``duration_ns``: default = span of its time series and videos.
    """

    id: str
    split: str | None = None
    timeseries: Mapping[str, TimeSeriesInput] = field(default_factory=dict)
    videos: Mapping[str, str | os.PathLike] = field(default_factory=dict)
    events: Mapping[str, Sequence[EventRow]] = field(default_factory=dict)
    meta: Mapping[str, Any] | None = None
    duration_ns: int | None = None


def _default_kind(events_name: str) -> str:
    return {"narrations": "narration", "summaries": "summary"}.get(events_name, "label")


def check_timeseries(rec_id: str, name: str, ts: TimeSeriesInput) -> tuple[np.ndarray, np.ndarray]:
    """``(t_ns int64, data float32)`` of a validated time series; InputError naming ``rec_id``/``name``."""
    where = f"recording {rec_id!r}, stream {name!r}"
    t = np.asarray(ts.t_ns)
    x = np.asarray(ts.data)
    if t.ndim != 1:
        raise InputError(f"{where}: t_ns must be 1-D (N,), got shape {t.shape}")
    if not np.issubdtype(t.dtype, np.integer):
        raise InputError(f"{where}: t_ns must be integer nanoseconds, got {t.dtype}; convert seconds with "
                         "np.round(t_sec * 1e9).astype(np.int64)")
    if x.ndim != 2:
        raise InputError(f"{where}: data must be 2-D (N, C), got shape {x.shape}"
                         + ("; use data.reshape(-1, 1) for one channel" if x.ndim == 1 else ""))
    if x.shape[0] != t.shape[0]:
        raise InputError(f"{where}: data has {x.shape[0]} rows but t_ns has {t.shape[0]}")
    if t.shape[0] < 2:
        raise InputError(f"{where}: needs at least 2 samples, got {t.shape[0]}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)) or x.dtype == np.bool_:
        raise InputError(f"{where}: data must be numeric, got {x.dtype}")
    channels, units = list(ts.channels), list(ts.units)
    if len(channels) != x.shape[1] or len(units) != x.shape[1]:
        raise InputError(f"{where}: data has {x.shape[1]} columns but {len(channels)} channels and "
                         f"{len(units)} units were given")
    if len(set(channels)) != len(channels):
        raise InputError(f"{where}: channel names repeat: {channels}")
    t = t.astype(np.int64)
    d = np.diff(t)
    if np.any(d <= 0):
        i = int(np.flatnonzero(d <= 0)[0])
        raise InputError(f"{where}: t_ns must be strictly increasing; t_ns[{i}] = {t[i]} then t_ns[{i + 1}] = "
                         f"{t[i + 1]} (sort the samples and drop repeated times first)")
    xf = x.astype(np.float32)
    bad = ~np.isfinite(xf).all(axis=1)
    if bad.any():
        raise InputError(f"{where}: data has NaN or inf in {int(bad.sum())} rows (first at row "
                         f"{int(np.flatnonzero(bad)[0])}); drop those rows, gaps are found from the time stamps")
    if ts.rate_hz is not None and not (np.isfinite(ts.rate_hz) and ts.rate_hz > 0):
        raise InputError(f"{where}: rate_hz must be a positive number or None, got {ts.rate_hz!r}")
    return t, xf


def find_gaps(t_ns: np.ndarray, gap_factor: float = 5.0) -> list[tuple[int, int]]:
    """``(last sample before, first sample after)`` of every period longer than ``gap_factor`` × median."""
    d = np.diff(t_ns)
    if d.size == 0:
        return []
    limit = gap_factor * float(np.median(d))
    return [(int(t_ns[i]), int(t_ns[i + 1])) for i in np.flatnonzero(d > limit)]


def _event_rows(rec_id: str, name: str, rows: Sequence[EventRow]) -> list[dict[str, Any]]:
    where = f"recording {rec_id!r}, events {name!r}"
    out = []
    for i, r in enumerate(rows):
        if isinstance(r, Mapping):
            missing = [k for k in ("t_start_ns", "t_end_ns", "text") if k not in r]
            if missing:
                raise InputError(f"{where}: row {i} lacks {missing}")
            row = dict(r)
        elif isinstance(r, (list, tuple)) and len(r) == 3:
            row = {"t_start_ns": r[0], "t_end_ns": r[1], "text": r[2]}
        else:
            raise InputError(f"{where}: row {i} is {r!r}; expected (t_start_ns, t_end_ns, text) or a dict")
        for k in ("t_start_ns", "t_end_ns"):
            v = row[k]
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise InputError(f"{where}: row {i}: {k} is {v!r}; expected integer nanoseconds")
            row[k] = int(v)
        if row["t_end_ns"] < row["t_start_ns"]:
            raise InputError(f"{where}: row {i}: t_end_ns {row['t_end_ns']} < t_start_ns {row['t_start_ns']}")
        if not isinstance(row["text"], str):
            raise InputError(f"{where}: row {i}: text is {type(row['text']).__name__}, expected str")
        row.setdefault("text_raw", row["text"])
        row.setdefault("kind", _default_kind(name))
        row.setdefault("source", name)
        row.setdefault("uid", f"{rec_id}:{name}:{i}")
        row["recording_id"] = rec_id
        out.append(row)
    return out


def _check_recordings(recordings: Sequence[Recording]) -> None:
    if not recordings:
        raise InputError("write_store needs at least one Recording")
    seen: set[str] = set()
    kinds: dict[str, str] = {}
    for rec in recordings:
        if not isinstance(rec, Recording):
            raise InputError(f"expected Recording objects, got {type(rec).__name__}")
        if not isinstance(rec.id, str) or not NAME.match(rec.id):
            raise InputError(f"recording id {rec.id!r}: use letters, digits, '_', '-', '.' (it names folders)")
        if rec.id in seen:
            raise InputError(f"recording id {rec.id!r} appears twice")
        seen.add(rec.id)
        if not rec.timeseries and not rec.videos:
            raise InputError(f"recording {rec.id!r} has no time series and no video (windows need one)")
        names = [*rec.timeseries, *rec.videos, *rec.events]
        for kind, group in (("timeseries", rec.timeseries), ("video", rec.videos), ("events", rec.events)):
            for name in group:
                if not isinstance(name, str) or not NAME.match(name) or name == "text":
                    raise InputError(f"recording {rec.id!r}: stream name {name!r} is not allowed "
                                     "(letters, digits, '_', '-', '.'; 'text' is reserved)")
                if names.count(name) > 1:
                    raise InputError(f"recording {rec.id!r}: stream name {name!r} is used by two kinds")
                if kinds.setdefault(name, kind) != kind:
                    raise InputError(f"recording {rec.id!r}: stream {name!r} is {kind} here but {kinds[name]} in "
                                     "another recording (a name has one kind in a store)")
        if rec.meta is not None:
            try:
                json.dumps(rec.meta)
            except (TypeError, ValueError) as e:
                raise InputError(f"recording {rec.id!r}: meta is not JSON-serialisable ({e})") from None


def _fingerprint(recordings: Sequence[Recording], checked: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]) -> str:
    h = hashlib.sha256(b"byo-1")
    for (rid, name), (t, x) in sorted(checked.items()):
        h.update(f"{rid}|{name}|{x.shape}|{t[0]}|{t[-1]}\n".encode())
        h.update(np.ascontiguousarray(t).tobytes())
    for rec in recordings:
        for name, path in sorted(rec.videos.items()):
            h.update(f"{rec.id}|{name}|{os.fspath(path)}\n".encode())
    return h.hexdigest()[:32]


def write_store(
    url: str | os.PathLike,
    recordings: Sequence[Recording],
    *,
    dataset: str = "custom",
    overwrite: bool = False,
    gap_factor: float = 5.0,
    source_fingerprint: str | None = None,
    options: Mapping[str, Any] | None = None,
    **storage_options: Any,
) -> str:
    """Write a store at ``url`` (path or fsspec URL) from ``recordings``; returns its URL.

    Everything is validated before anything is written; a failure while writing leaves nothing at ``url``.
    Time series must be strictly increasing (they are refused, not sorted: the message names the recording,
    the stream and the first offending pair). The report (``reports/prepare.json``) lists, per recording,
    samples, measured rates, gaps, frames and events.
    """
    _check_recordings(recordings)
    if gap_factor <= 1:
        raise InputError(f"gap_factor must be > 1, got {gap_factor}")
    checked: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    events: dict[str, list[dict[str, Any]]] = {}
    for rec in recordings:
        for name, ts in rec.timeseries.items():
            if not isinstance(ts, TimeSeriesInput):
                raise InputError(f"recording {rec.id!r}, stream {name!r}: expected a TimeSeriesInput, "
                                 f"got {type(ts).__name__}")
            checked[(rec.id, name)] = check_timeseries(rec.id, name, ts)
        for name, rows in rec.events.items():
            events.setdefault(name, []).extend(_event_rows(rec.id, name, rows))
    videos = {(rec.id, name): probe_video(normalize_url(path)) for rec in recordings
              for name, path in rec.videos.items()}  # MediaError names the file

    fingerprint = source_fingerprint or _fingerprint(recordings, checked)
    report: dict[str, Any] = {"dataset": dataset, "gap_factor": gap_factor, "recordings": {}}
    rec_rows, stream_rows, gap_rows = [], [], []
    with StoreWriter(url, dataset=dataset, source_fingerprint=fingerprint, options=dict(options or {}),
                     overwrite=overwrite, **storage_options) as writer:
        for rec in recordings:
            rep: dict[str, Any] = {}
            spans: list[tuple[int, int]] = []
            for name, ts in rec.timeseries.items():
                t, x = checked[(rec.id, name)]
                measured = NS / float(np.median(np.diff(t)))
                rate = float(ts.rate_hz) if ts.rate_hz is not None else round(measured, 3)
                rel = writer.write_timeseries(rec.id, name, t, x, list(ts.channels), list(ts.units), rate_hz=rate)
                gaps = find_gaps(t, gap_factor)
                stream_rows.append({"recording_id": rec.id, "stream": name, "kind": "timeseries", "uri": rel,
                                    "t_start_ns": int(t[0]), "t_end_ns": int(t[-1]), "n_samples": int(t.size),
                                    "rate_hz": rate, "channels": list(ts.channels), "units": list(ts.units)})
                gap_rows.extend({"recording_id": rec.id, "stream": name, "t_start_ns": a, "t_end_ns": b}
                                for a, b in gaps)
                rep[name] = {"samples": int(t.size), "measured_rate_hz": round(measured, 3), "rate_hz": rate,
                             "gaps": len(gaps), "gaps_sec": [[(a - t[0]) / NS, (b - a) / NS] for a, b in gaps]}
                spans.append((int(t[0]), int(t[-1])))
            for name, path in rec.videos.items():
                info = videos[(rec.id, name)]
                rel = writer.write_video_index(rec.id, name, info.pts_ns, info.keyframe)
                stream_rows.append({"recording_id": rec.id, "stream": name, "kind": "video",
                                    "uri": normalize_url(path), "index_uri": rel, "t_start_ns": int(info.pts_ns[0]),
                                    "t_end_ns": int(info.pts_ns[-1]), "n_samples": info.num_frames,
                                    "rate_hz": info.fps, "width": info.width, "height": info.height,
                                    "codec": info.codec})
                rep[name] = {"frames": info.num_frames, "fps": info.fps, "size": [info.width, info.height],
                             "codec": info.codec, "first_pts_sec": info.pts_ns[0] / NS}
                spans.append((int(info.pts_ns[0]), int(info.pts_ns[-1])))
            for name in rec.events:
                rows = [r for r in events[name] if r["recording_id"] == rec.id]
                rep[name] = {"events": len(rows)}
                if rows:
                    stream_rows.append({"recording_id": rec.id, "stream": name, "kind": "events",
                                        "uri": f"events/{name}.parquet",
                                        "t_start_ns": min(r["t_start_ns"] for r in rows),
                                        "t_end_ns": max(r["t_end_ns"] for r in rows), "n_samples": len(rows)})
            start, end = min(a for a, _ in spans), max(b for _, b in spans)
            duration = int(rec.duration_ns) if rec.duration_ns is not None else end - start
            modalities = [*rec.timeseries, *rec.videos, *(n for n in rec.events if rep[n]["events"])]
            rec_rows.append({"recording_id": rec.id, "dataset": dataset, "split": rec.split, "duration_ns": duration,
                             "modalities": modalities,
                             "meta_json": json.dumps(dict(rec.meta), sort_keys=True) if rec.meta is not None else None})
            report["recordings"][rec.id] = rep
        writer.write_table("recordings", _table("recordings", rec_rows))
        writer.write_table("streams", _table("streams", stream_rows))
        writer.write_table("gaps", _table("gaps", gap_rows))
        for name, rows in events.items():
            if rows:
                writer.write_events(name, _events_table(name, rows))
        writer.write_json("reports/prepare.json", report)
    return writer.url


def _table(kind: str, rows: list[dict[str, Any]]) -> pa.Table:
    schema = table_schema(kind)
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def _events_table(name: str, rows: list[dict[str, Any]]) -> pa.Table:
    """The schema's columns first, then any extra keys the rows carry (missing extras → null)."""
    base = table_schema("events").names
    extra = sorted({k for r in rows for k in r} - set(base))
    try:
        return pa.Table.from_pylist([{k: r.get(k) for k in [*base, *extra]} for r in rows])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputError(f"events {name!r}: the extra columns {extra} have mixed types ({e})") from None


__all__ = ["InputError", "Recording", "TimeSeriesInput", "find_gaps", "write_store"]
