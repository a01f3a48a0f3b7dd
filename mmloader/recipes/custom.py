"""Bring your own dataset: write a store from plain arrays, media files and label lists.

>>> import numpy as np
>>> from mmloader.recipes.custom import Recording, TimeSeriesInput, write_store
>>> t_ns = np.arange(3000, dtype=np.int64) * 20_000_000            # 50 Hz, ns on the recording's clock
>>> acc = np.random.randn(3000, 3).astype(np.float32)
>>> url = write_store("/data/wrist-store", dataset="wrist", recordings=[
...     Recording(id="subject1-day1", split="train",
...               timeseries={"wrist": TimeSeriesInput(t_ns, acc, ["acc_x", "acc_y", "acc_z"], ["m/s^2"] * 3)},
...               events={"labels": [(0, 10_000_000_000, "walking")]}),
... ])

Time is int64 nanoseconds on each recording's own clock (any origin). ``write_store`` takes any iterable
of recordings (a list, or a generator for datasets larger than memory: it is read once, one recording at a
time), validates every input as it arrives (errors name the recording and the stream), measures rates, finds
gaps (periods longer than ``gap_factor`` × the median period; windows mask them, never fill them), probes
videos (their pts index is stored; the media stays where it is) and writes the recordings / streams / gaps
tables for you, atomically. A store with no recording is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np

from ..errors import MMLoaderError, StoreFormatError
from ..fsutil import normalize_url
from ..store.writer import StoreWriter, check_recording_id
from ..video.probe import MediaIdentity, VideoInfo, media_identity, probe_video
from ..video.transcode import VideoProfile, resolve_profile
from .media import transcode_into_store
from .base import REPORT
from .imu import NS, find_gaps, gaps_relative_sec, median_period_ns
from .rows import RecordingRows, StoreRows, meta_json, video_report

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # stream names
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_END = object()
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
    if t.dtype.kind == "u" and t.size and int(t.max()) > INT64_MAX:
        raise InputError(f"{where}: t_ns has values above the int64 range (max {int(t.max())})")
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
            if not INT64_MIN <= int(v) <= INT64_MAX:
                raise InputError(f"{where}: row {i}: {k} is {v!r}, outside the int64 range of nanoseconds")
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


def _check_recording(rec: Any, seen: set[str], kinds: dict[str, str]) -> None:
    """Check one recording as it arrives; ``seen`` (ids so far) and ``kinds`` (stream name → kind) carry
    the rules that span recordings, and are updated once the recording passes."""
    if not isinstance(rec, Recording):
        raise InputError(f"expected Recording objects, got {type(rec).__name__}")
    try:
        check_recording_id(rec.id, "Recording.id")
    except StoreFormatError as e:
        raise InputError(f"recording id {rec.id!r}: {e} (it names folders)") from None
    if rec.id in seen:
        raise InputError(f"recording id {rec.id!r} appears twice")
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
            if kinds.get(name, kind) != kind:
                raise InputError(f"recording {rec.id!r}: stream {name!r} is {kind} here but {kinds[name]} in "
                                 "another recording (a name has one kind in a store)")
    if rec.meta is not None:
        try:
            json.dumps(rec.meta, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InputError(f"recording {rec.id!r}: meta is not JSON-serialisable ({e})") from None
    if rec.duration_ns is not None:
        d = rec.duration_ns
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)) or not 0 < int(d) <= INT64_MAX:
            raise InputError(f"recording {rec.id!r}: duration_ns is {d!r}; expected a positive integer of "
                             "nanoseconds (or None: the span of its streams)")
    for name, ts in rec.timeseries.items():
        if not isinstance(ts, TimeSeriesInput):
            raise InputError(f"recording {rec.id!r}, stream {name!r}: expected a TimeSeriesInput, "
                             f"got {type(ts).__name__}")
    seen.add(rec.id)
    for kind, group in (("timeseries", rec.timeseries), ("video", rec.videos), ("events", rec.events)):
        for name in group:
            kinds.setdefault(name, kind)


def _recording_digest(rec: Recording, checked: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """What the source fingerprint sees of one recording (its time stamps, shapes and video paths)."""
    h = hashlib.sha256()
    for name, (t, x) in sorted(checked.items()):
        h.update(f"{rec.id}|{name}|{x.shape}|{t[0]}|{t[-1]}\n".encode())
        h.update(np.ascontiguousarray(t).tobytes())
    for name, path in sorted(rec.videos.items()):
        h.update(f"{rec.id}|{name}|{os.fspath(path)}\n".encode())
    return h.hexdigest()


def _fingerprint(digests: list[str]) -> str:
    """The source fingerprint, independent of the order in which the recordings came."""
    h = hashlib.sha256(b"byo-2")
    for d in sorted(digests):
        h.update(d.encode())
    return h.hexdigest()[:32]


def write_store(
    url: str | os.PathLike,
    recordings: Iterable[Recording],
    *,
    dataset: str = "custom",
    overwrite: bool = False,
    gap_factor: float = 5.0,
    source_fingerprint: str | None = None,
    options: Mapping[str, Any] | None = None,
    video_profile: str | VideoProfile | None = None,
    **storage_options: Any,
) -> str:
    """Write a store at ``url`` (path or fsspec URL) from ``recordings``; returns its URL.

    ``recordings`` is any iterable of :class:`Recording` (a list, a tuple, a generator). It is read once:
    each recording is validated, then written, then let go before the next one is read, so a generator that
    loads one recording at a time writes a dataset larger than memory (only table rows and event rows are
    kept until the end). No recording → InputError, and nothing is created. A failure, in validation, in
    the iterable itself or while writing, leaves nothing at ``url``. Time series must be strictly increasing
    (they are refused, not sorted: the message names the recording, the stream and the first offending
    pair). The report (``reports/prepare.json``) lists, per recording, samples, measured rates, gaps, frames
    and events.

    ``video_profile`` (a name of ``mmloader.VIDEO_PROFILES`` or a ``VideoProfile``) transcodes every video once
    into the store (``media/<recording>/<stream>.<profile>.mp4``; frames keep their capture times) instead of
    referencing the files; the profile is recorded in the manifest's options.
    """
    profile = resolve_profile(video_profile)
    if profile is not None:
        options = {**dict(options or {}), "video_profile": profile.describe()}
    if isinstance(gap_factor, bool) or not isinstance(gap_factor, (int, float)) or not (
            np.isfinite(gap_factor) and gap_factor > 1):
        raise InputError(f"gap_factor must be a finite number > 1, got {gap_factor!r}")
    it, pending = _first_recording(recordings)
    seen: set[str] = set()
    kinds: dict[str, str] = {}
    digests: list[str] = []
    rows = StoreRows(error=InputError)
    report: dict[str, Any] = {"dataset": dataset, "gap_factor": gap_factor, "recordings": {}}
    with StoreWriter(url, dataset=dataset, source_fingerprint=source_fingerprint or "", options=dict(options or {}),
                     overwrite=overwrite, protect=list(pending[0].videos.values()), **storage_options) as writer:
        for rec in _one_at_a_time(pending, it):
            _check_recording(rec, seen, kinds)
            writer.protect(list(rec.videos.values()))  # a video inside url: overwrite would delete it
            out, digest = _write_recording(writer, rec, dataset, gap_factor, profile)
            digests.append(digest)
            rows.add(out)
            report["recordings"][rec.id] = out.report
            del rec, out  # let this recording go before the next one is read
        writer.source_fingerprint = source_fingerprint or _fingerprint(digests)
        rows.write(writer)
        writer.write_json(REPORT, report)
    return writer.url


def _first_recording(recordings: Iterable[Recording]) -> tuple[Iterator[Recording], list[Recording]]:
    """``(iterator over the rest, [first recording])``, the first checked before anything is created at the
    destination; InputError when ``recordings`` is not an iterable of recordings or is empty."""
    if isinstance(recordings, (Recording, str, bytes, Mapping)):
        raise InputError("recordings must be an iterable of Recording objects (a list or a generator), got "
                         f"{type(recordings).__name__}")
    try:
        it = iter(recordings)
    except TypeError:
        raise InputError("recordings must be an iterable of Recording objects (a list or a generator), got "
                         f"{type(recordings).__name__}") from None
    first = next(it, _END)
    if first is _END:
        raise InputError("write_store needs at least one Recording (an empty store is never written)")
    _check_recording(first, set(), {})
    return it, [first]


def _one_at_a_time(pending: list[Recording], rest: Iterator[Recording]) -> Iterator[Recording]:
    """The recording in ``pending`` (popped: no reference is kept here), then those of ``rest``."""
    while pending:
        yield pending.pop()
    yield from rest


def _videos(writer: StoreWriter, rec: Recording,
            profile: VideoProfile | None) -> dict[str, tuple[str, VideoInfo, MediaIdentity, dict[str, Any]]]:
    """Per video stream: (uri, probed index, identity, report) of the file the store references: the recording's
    own file, or its transcode with ``profile`` inside the store."""
    out = {}
    for name, path in rec.videos.items():
        url = normalize_url(path)
        if profile is not None:
            t = transcode_into_store(writer, url, rec.id, name, profile)
            out[name] = (t.uri, t.info, t.identity, {**video_report(t.info), "transcoded": t.report})
            continue
        ident = media_identity(url)  # identity before the probe: the index then describes this very file
        info = probe_video(url)
        out[name] = (url, info, ident, video_report(info))
    return out


def _write_recording(writer: StoreWriter, rec: Recording, dataset: str, gap_factor: float,
                     profile: VideoProfile | None = None) -> tuple[RecordingRows, str]:
    """Write one checked recording's arrays; its rows and its source digest."""
    checked = {name: check_timeseries(rec.id, name, ts) for name, ts in rec.timeseries.items()}
    events = {name: _event_rows(rec.id, name, rows) for name, rows in rec.events.items()}
    videos = _videos(writer, rec, profile)
    digest = _recording_digest(rec, checked)
    out = RecordingRows(rec.id)
    spans: list[tuple[int, int]] = []
    for name, ts in rec.timeseries.items():
        t, x = checked.pop(name)
        measured = NS / median_period_ns(t)
        rate = float(ts.rate_hz) if ts.rate_hz is not None else round(measured, 3)
        gaps = find_gaps(t, gap_factor)
        out.write_timeseries(writer, name, t, x, list(ts.channels), list(ts.units), rate, gaps)
        out.report[name] = {"samples": int(t.size), "measured_rate_hz": round(measured, 3), "rate_hz": rate,
                            "gaps": len(gaps), "gaps_sec": gaps_relative_sec(gaps, t[0])}
        spans.append((int(t[0]), int(t[-1])))
        del t, x
    for name in rec.videos:
        uri, info, ident, report = videos.pop(name)
        out.write_video(writer, name, uri, info, identity=ident)
        out.report[name] = report
        spans.append((int(info.pts_ns[0]), int(info.pts_ns[-1])))
    for name, rows in events.items():
        out.report[name] = {"events": len(rows)}
        out.add_events(name, rows)
    start, end = min(a for a, _ in spans), max(b for _, b in spans)
    duration = int(rec.duration_ns) if rec.duration_ns is not None else end - start
    modalities = [*rec.timeseries, *rec.videos, *(n for n in rec.events if out.report[n]["events"])]
    out.set_recording(dataset, rec.split, duration, modalities,
                      meta_json(dict(rec.meta)) if rec.meta is not None else None)
    return out, digest


__all__ = ["InputError", "Recording", "TimeSeriesInput", "find_gaps", "write_store"]
