"""The window index: candidates cut from each recording's span, checked, and dropped with a reason.

See ``mmloader.windows.spec`` for the anchors and the drop reasons (``WindowSet.report()``). Each drop rule is one
function below (``_drop_*``); ``_apply_drop_rules`` runs them in a fixed order, and a dropped window is counted under
the first rule it fails. All times are int64 ns on the recording's clock.
"""

from __future__ import annotations

import numbers
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..store import Store
from ..video.select import nearest_frames
from .spec import MAX_FRAME_REFS, MAX_WINDOWS, NS, Modalities, WindowSpec, frames_held, repr_arg, resolve_modalities

StreamRows = dict[str, dict[str, Any]]  # stream name -> its row of the store's streams table


def build_index(store: Store, spec: WindowSpec, recording_ids: list[str] | None = None,
                max_windows: int | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """The window index (one row per kept window) and the report of every candidate's fate.

    Before anything per window is allocated, the candidates are counted from the recordings' spans: more than
    ``max_windows`` (default ``MAX_WINDOWS``) candidate windows, or more than ``MAX_FRAME_REFS`` frame indices,
    raise ValueError naming ``stride``/``sec``/``frames``."""
    mods = resolve_modalities(store, spec)
    if spec.label_stream is not None and spec.label_stream not in store.event_names:
        raise ValueError(f"{store.url}: label_stream={spec.label_stream!r} is not an events table of this store "
                         f"(it has {store.event_names})")
    by_rec: dict[str, StreamRows] = {}
    for row in store.streams.to_pylist():
        by_rec.setdefault(row["recording_id"], {})[row["stream"]] = row
    rec_ids = recording_ids if recording_ids is not None else store.recordings["recording_id"].to_pylist()
    spans = {rid: _span(by_rec.get(rid, {}), mods) for rid in rec_ids}
    n_frames = len(spec.frame_offsets_ns())
    _check_sizes(store, spec, mods, by_rec, spans, n_frames, MAX_WINDOWS if max_windows is None else max_windows)
    src = _Sources.read(store, spec, mods, by_rec)

    dropped: Counter[str] = Counter()
    columns = _Columns(mods, src.labels is not None, n_frames)
    n_candidates = 0
    grid, frame_off = spec.grid_offsets_ns(), spec.frame_offsets_ns()
    for rid in rec_ids:
        if spans[rid] is None:
            continue
        rec_events = sorted(src.events.get(rid, [])) if src.events is not None else []
        if spec.anchor == "events" and _recording_too_short(spec, spans[rid]):
            n_candidates += len(rec_events)
            dropped["recording_too_short"] += len(rec_events)  # a key even when 0: the report has always shown it
            continue
        c = _cut_candidates(spec, rid, src.by_rec.get(rid, {}), spans[rid], rec_events)
        n_candidates += len(c.t0)
        _apply_drop_rules(c, store, spec, mods, src, grid, frame_off)
        dropped.update(r for r in c.reason[~c.keep])
        columns.add(c, src.splits.get(rid))
    index = columns.table(spec)
    report = {
        "candidates": n_candidates,
        "kept": index.num_rows,
        "dropped": dict(sorted(dropped.items())),
        "recordings": len(set(columns.recording_ids)),
    }
    assert report["kept"] + sum(report["dropped"].values()) == n_candidates
    return index, report


@dataclass(frozen=True)
class _Sources:
    """What the drop rules read from the store, gathered once per index: stream rows per recording, gaps per
    (recording, stream) as [(t_start_ns, t_end_ns)], narrations per recording as [(t_ns, text)] (None unless text
    is requested), label segments per recording as [(t_start_ns, t_end_ns, text)] (None without ``label_stream``),
    and each recording's split."""

    by_rec: dict[str, StreamRows]
    gaps: dict[tuple[str, str], list[tuple[int, int]]]
    events: dict[str, list[tuple[int, str]]] | None
    labels: dict[str, list[tuple[int, int, str]]] | None
    splits: dict[str, str | None]

    @classmethod
    def read(cls, store: Store, spec: WindowSpec, mods: Modalities, by_rec: dict[str, StreamRows]) -> _Sources:
        gaps: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for g in store.gaps.to_pylist():
            gaps.setdefault((g["recording_id"], g["stream"]), []).append((g["t_start_ns"], g["t_end_ns"]))
        events = None
        if mods.text:
            ev = store.events(spec.text_stream)
            if "kind" in ev.column_names:
                ev = ev.filter(pc.equal(ev["kind"], "narration")) if spec.text_stream == "narrations" else ev
            events = {}
            for rid, t, text in zip(ev["recording_id"].to_pylist(), ev["t_start_ns"].to_pylist(),
                                    ev["text"].to_pylist()):
                events.setdefault(rid, []).append((t, text))
        labels = None
        if spec.label_stream is not None:
            lab = store.events(spec.label_stream)
            labels = {}
            for rid, a, b, text in zip(lab["recording_id"].to_pylist(), lab["t_start_ns"].to_pylist(),
                                       lab["t_end_ns"].to_pylist(), lab["text"].to_pylist()):
                labels.setdefault(rid, []).append((a, b, text))
        splits = dict(zip(store.recordings["recording_id"].to_pylist(), store.recordings["split"].to_pylist()))
        return cls(by_rec, gaps, events, labels, splits)


@dataclass
class _Candidates:
    """One recording's candidate windows ``[t0, t0 + sec)`` and their fate so far: ``keep`` (bool per candidate)
    and ``reason`` (the first rule each dropped candidate failed). The rules fill ``frame_idx`` (video stream ->
    (n, frames) int32 frame indices), ``text`` and ``label`` (one entry per candidate)."""

    rid: str
    streams: StreamRows
    t0: np.ndarray  # int64 ns
    events: list[tuple[int, str]]  # the recording's narrations, sorted by time
    texts: list[str] | None  # anchor="events": each candidate's own narration
    keep: np.ndarray = field(init=False)
    reason: np.ndarray = field(init=False)
    frame_idx: dict[str, np.ndarray] = field(default_factory=dict)
    text: list[Any] = field(default_factory=list)
    label: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.keep = np.ones(len(self.t0), dtype=bool)
        self.reason = np.full(len(self.t0), "", dtype=object)

    def drop(self, mask: np.ndarray, why: str) -> None:
        """Drop the still-kept candidates where ``mask`` holds, for reason ``why``."""
        m = mask & self.keep
        self.reason[m] = why
        self.keep[m] = False


def _recording_too_short(spec: WindowSpec, span: tuple[int, int]) -> bool:
    """Drop rule ``recording_too_short`` (anchor="events"): the span is shorter than one window, so every
    narration's window is dropped (tile mode simply cuts no candidate there)."""
    start, end = span
    return end - start < spec.sec_ns


def _cut_candidates(spec: WindowSpec, rid: str, streams: StreamRows, span: tuple[int, int],
                    rec_events: list[tuple[int, str]]) -> _Candidates:
    """The candidates of one recording: tiles of ``stride`` over the span, or one window centred on each narration
    and clamped into the span."""
    start, end = span
    sec = spec.sec_ns
    if spec.anchor == "tile":
        n = (end - start - sec) // spec.stride_ns + 1 if end - start >= sec else 0
        t0 = start + np.arange(max(n, 0), dtype=np.int64) * spec.stride_ns
        return _Candidates(rid, streams, t0, rec_events, None)
    centres = np.array([t for t, _ in rec_events], dtype=np.int64)
    t0 = np.clip(centres - sec // 2, start, end - sec)
    return _Candidates(rid, streams, t0, rec_events, [x for _, x in rec_events])


def _apply_drop_rules(c: _Candidates, store: Store, spec: WindowSpec, mods: Modalities, src: _Sources,
                      grid: np.ndarray, frame_off: np.ndarray) -> None:
    """Every drop rule, in this order: missing modality; per time series (in request order) not covered, then gap;
    per video stream too few frames, then not covered; no text; no label."""
    _drop_missing_modality(c, mods)
    for m in mods.timeseries:
        if m in c.streams:
            _drop_timeseries_not_covered(c, m, grid)
            _drop_gap(c, m, src.gaps.get((c.rid, m), []), spec)
    for v in mods.video:
        if v in c.streams:
            pts, _ = store.video_index(c.rid, v)
            fps = c.streams[v]["rate_hz"] or (NS / np.median(np.diff(pts)) if len(pts) > 1 else 1.0)
            _drop_too_few_frames(c, v, spec, fps, len(frame_off))
            c.frame_idx[v] = _drop_video_not_covered(c, v, pts, fps, spec, frame_off)
    if mods.text:
        c.text = _drop_no_text(c, spec)
    if src.labels is not None:
        c.label = _drop_no_label(c, src.labels.get(c.rid, []), spec.sec_ns)


def _drop_missing_modality(c: _Candidates, mods: Modalities) -> None:
    """``missing_<m>``: the recording lacks a requested time series or video stream (every candidate)."""
    for m in (*mods.timeseries, *mods.video):
        if m not in c.streams:
            c.drop(np.ones(len(c.t0), bool), f"missing_{m}")


def _drop_timeseries_not_covered(c: _Candidates, m: str, grid: np.ndarray) -> None:
    """``<m>_not_covered``: the window's sample grid (``t0 + grid``) leaves the stream's [t_start, t_end]."""
    s = c.streams[m]
    c.drop((c.t0 + grid[0] < s["t_start_ns"]) | (c.t0 + grid[-1] > s["t_end_ns"]), f"{m}_not_covered")


def _drop_gap(c: _Candidates, m: str, gaps: list[tuple[int, int]], spec: WindowSpec) -> None:
    """``<m>_gap``: more than ``max_masked_fraction`` of the window lies inside the stream's gaps."""
    sec = spec.sec_ns
    masked = np.zeros(len(c.t0), dtype=np.int64)
    for a, b in gaps:
        masked += np.clip(np.minimum(c.t0 + sec, b) - np.maximum(c.t0, a), 0, None)
    c.drop(masked > spec.max_masked_fraction * sec, f"{m}_gap")


def _drop_too_few_frames(c: _Candidates, v: str, spec: WindowSpec, fps: float, n_frames: int) -> None:
    """``<v>_too_few_frames``: more frames than a window holds at this recording's rate would repeat frames
    (see ``frames_held``), so all of its windows go."""
    c.drop(np.full(len(c.t0), n_frames > frames_held(spec.sec, fps)), f"{v}_too_few_frames")


def _drop_video_not_covered(c: _Candidates, v: str, pts: np.ndarray, fps: float, spec: WindowSpec,
                            frame_off: np.ndarray) -> np.ndarray:
    """``<v>_not_covered``: some target time ``t0 + frame_off`` has no frame within the tolerance (default half a
    frame period). Returns the nearest frame indices of every candidate, (n, frames) int32."""
    n_frames = len(frame_off)
    tol = round((spec.video_tolerance_sec if spec.video_tolerance_sec is not None else 0.5 / fps) * NS)
    idx = np.empty((len(c.t0), n_frames), dtype=np.int32)
    far = np.zeros(len(c.t0), dtype=bool)
    step = max(1, (1 << 20) // n_frames)  # targets in blocks of ~1M: bounded temporaries
    for a in range(0, len(c.t0), step):
        targets = c.t0[a:a + step, None] + frame_off[None, :]
        i, err = nearest_frames(pts, targets.ravel())
        far[a:a + step] = (err.reshape(targets.shape) > tol).any(axis=1)
        idx[a:a + step] = i.reshape(targets.shape)
    c.drop(far, f"{v}_not_covered")
    return idx


def _drop_no_text(c: _Candidates, spec: WindowSpec) -> list[Any]:
    """``no_text`` (anchor="tile"): no narration starts inside the window. Returns each candidate's text: the
    list of narrations in ``[t0, t0 + sec)`` (tile) or its own narration (events)."""
    if spec.anchor != "tile":
        return c.texts
    ts_ev = np.array([t for t, _ in c.events], dtype=np.int64)
    lo = np.searchsorted(ts_ev, c.t0, side="left")
    hi = np.searchsorted(ts_ev, c.t0 + spec.sec_ns, side="left")
    window_text = [[c.events[j][1] for j in range(a, b)] for a, b in zip(lo, hi)]
    c.drop(hi == lo, "no_text")
    return window_text


def _drop_no_label(c: _Candidates, segments: list[tuple[int, int, str]], sec: int) -> list[str | None]:
    """``no_label``: no labelled segment overlaps the window. Returns each candidate's label (see
    ``_covering_label``)."""
    window_label = [_covering_label(segments, int(a), int(a) + sec) for a in c.t0]
    c.drop(np.array([lab is None for lab in window_label], dtype=bool), "no_label")
    return window_label


class _Columns:
    """The index columns, filled one recording at a time: Python lists for strings, numpy blocks for times and
    frame indices (~8 B per window, concatenated once in ``table``)."""

    def __init__(self, mods: Modalities, labelled: bool, n_frames: int) -> None:
        self.mods, self.labelled, self.n_frames = mods, labelled, n_frames
        self.recording_ids: list[str] = []
        self.splits: list[str | None] = []
        self.t0: list[np.ndarray] = []
        self.text: list[Any] = []
        self.label: list[str | None] = []
        self.frames: dict[str, list[np.ndarray]] = {v: [] for v in mods.video}

    def add(self, c: _Candidates, split: str | None) -> None:
        """Append the kept candidates of one recording."""
        kept = np.flatnonzero(c.keep)
        self.recording_ids.extend([c.rid] * len(kept))
        self.splits.extend([split] * len(kept))
        self.t0.append(c.t0[kept])
        if self.mods.text:
            self.text.extend(c.text[i] for i in kept)
        if self.labelled:
            self.label.extend(c.label[i] for i in kept)
        for v in self.mods.video:
            self.frames[v].append(c.frame_idx[v][kept] if v in c.frame_idx
                                  else np.empty((0, self.n_frames), np.int32))

    def table(self, spec: WindowSpec) -> pa.Table:
        """recording_id, split, t0_ns, t1_ns (+ text: a string per window for anchor="events", else a list;
        + label; + ``<video>_idx``: a list of ``n_frames`` int32 frame indices per video stream)."""
        t0 = np.concatenate(self.t0) if self.t0 else np.empty(0, np.int64)
        cols: dict[str, Any] = {"recording_id": self.recording_ids, "split": self.splits,
                                "t0_ns": pa.array(t0, pa.int64()), "t1_ns": pa.array(t0 + spec.sec_ns, pa.int64())}
        schema = [("recording_id", pa.string()), ("split", pa.string()), ("t0_ns", pa.int64()), ("t1_ns", pa.int64())]
        if self.mods.text:
            cols["text"] = self.text
            schema.append(("text", pa.string() if spec.anchor == "events" else pa.list_(pa.string())))
        if self.labelled:
            cols["label"] = self.label
            schema.append(("label", pa.string()))
        for v in self.mods.video:
            blocks = self.frames[v]
            flat = np.concatenate(blocks) if blocks else np.empty((0, self.n_frames), np.int32)
            offsets = pa.array(np.arange(len(flat) + 1, dtype=np.int32) * self.n_frames, pa.int32())
            cols[f"{v}_idx"] = pa.ListArray.from_arrays(offsets, pa.array(flat.ravel(), pa.int32()))
            schema.append((f"{v}_idx", pa.list_(pa.int32())))
        return pa.Table.from_pydict(cols, schema=pa.schema(schema))


def _span(srows: StreamRows, mods: Modalities) -> tuple[int, int] | None:
    """[start, end] covered by all of a recording's requested non-text streams (all its non-event streams when
    only text is requested), or None when it has none of them."""
    span_streams = [srows[m] for m in (*mods.timeseries, *mods.video) if m in srows] or [
        s for s in srows.values() if s["kind"] != "events"
    ]
    if not span_streams:
        return None
    return max(s["t_start_ns"] for s in span_streams), min(s["t_end_ns"] for s in span_streams)


def _check_sizes(store: Store, spec: WindowSpec, mods: Modalities, by_rec: dict[str, StreamRows],
                 spans: dict[str, tuple[int, int] | None], n_frames: int, max_windows: int) -> None:
    """Refuse, before any per-window allocation, what would exceed the stated bounds or repeat frames."""
    if isinstance(max_windows, bool) or not isinstance(max_windows, numbers.Integral) or max_windows < 1:
        raise ValueError(f"max_windows must be a positive integer, got {repr_arg(max_windows)}")
    if spec.anchor == "tile":
        n = sum((e - s - spec.sec_ns) // spec.stride_ns + 1 for s, e in filter(None, spans.values())
                if e - s >= spec.sec_ns)
    elif mods.video:
        n = store.events(spec.text_stream).num_rows  # one candidate per event at most
    else:
        n = 0
    arg = "stride" if spec.stride is not None else "sec"
    if spec.anchor == "tile" and n > max_windows:
        raise ValueError(f"{arg}={getattr(spec, arg)!r} would cut {n:,} windows from {len(spans)} recordings; at most "
                         f"{max_windows:,} (max_windows=) keep the window index in memory (~100 B per window): use a "
                         f"longer stride, or pass max_windows=")
    refs = n * n_frames * len(mods.video)
    if refs > MAX_FRAME_REFS:
        raise ValueError(f"frames: {n:,} windows x {n_frames} frames x {len(mods.video)} video stream(s) are {refs:,} "
                         f"frame indices; at most {MAX_FRAME_REFS:,} (4 B each in the index): ask fewer frames or "
                         f"a longer stride")
    if n_frames <= 1 or not mods.video:
        return
    for v in mods.video:
        rates = [rows[v]["rate_hz"] for rid, rows in by_rec.items()
                 if rid in spans and v in rows and rows[v]["rate_hz"]]
        if rates and n_frames > frames_held(spec.sec, max(rates)):
            held = frames_held(spec.sec, max(rates))
            arg = "frames" if spec.frames is not None else "video_fps"
            raise ValueError(f"{arg}={getattr(spec, arg)!r} asks {n_frames} frames per window, but a {spec.sec:g} s "
                             f"window holds only {held} frame(s) of {v!r} at {max(rates):g} fps (its fastest "
                             f"recording); more would repeat frames. Ask at most {held} frames, or a longer sec")


def _covering_label(segments: list[tuple[int, int, str]], t0: int, t1: int) -> str | None:
    """The text of the segment overlapping ``[t0, t1)`` the most (ties: the earlier segment), or None."""
    best, best_overlap = None, 0
    for a, b, text in segments:
        overlap = min(t1, b) - max(t0, a)
        if overlap > best_overlap:
            best, best_overlap = text, overlap
    return best
