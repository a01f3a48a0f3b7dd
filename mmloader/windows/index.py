"""The window index: candidates cut from every recording's span, checked, and dropped with a reason.

See ``mmloader.windows.spec`` for the anchors and the drop reasons (``WindowSet.report()``). Each drop rule is one
function below (``_drop_*``); ``_apply_drop_rules`` runs them in a fixed order, and a dropped window is counted under
the first rule it fails. All times are int64 ns on the recording's clock.

The candidates of all recordings are flat numpy columns (``_Candidates``: recording position, ``t0``, the first
failed rule), ordered by recording (store order, or ``recording_ids``' order) then by time, and each rule is a mask
over all of them at once; only the video rules visit the recordings one by one (each reads its frame times). The
index columns are gathered from per-recording and per-event Arrow arrays: nothing per window is a Python object.
Building is linear in recordings + candidates + gaps + events.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..store import Store
from ..video.select import nearest_frames
from .spec import MAX_FRAME_REFS, MAX_WINDOWS, NS, Modalities, WindowSpec, frames_held, repr_arg, resolve_modalities

REASON_TOO_SHORT = "recording_too_short"


def build_index(store: Store, spec: WindowSpec, recording_ids: list[str] | None = None,
                max_windows: int | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """The window index (one row per kept window) and the report of every candidate's fate.

    ``recording_ids``: the recordings to cut, in this order (default: the store's, in its order; an id given twice
    is cut once). Before anything per window is allocated, the candidates are counted from the recordings' spans:
    more than ``max_windows`` (default ``MAX_WINDOWS``) candidate windows, or more than ``MAX_FRAME_REFS`` frame
    indices, raise ValueError naming ``stride``/``sec``/``frames``."""
    mods = resolve_modalities(store, spec)
    if spec.label_stream is not None and spec.label_stream not in store.event_names:
        raise ValueError(f"{store.url}: label_stream={spec.label_stream!r} is not an events table of this store "
                         f"(it has {store.event_names})")
    recs = _Recordings.read(store, mods, recording_ids)
    n_frames = len(spec.frame_offsets_ns())
    _check_sizes(store, spec, mods, recs, n_frames, MAX_WINDOWS if max_windows is None else max_windows)
    src = _Sources.read(store, spec, mods, recs)
    c = _cut_candidates(spec, recs, src)
    _apply_drop_rules(c, store, spec, mods, recs, src)
    index = _table(c, spec, mods, recs, src, n_frames)
    report = {"candidates": c.n_candidates, "kept": index.num_rows, "dropped": c.dropped(),
              "recordings": int(np.count_nonzero(np.bincount(c.rec[c.keep], minlength=1)))}
    assert report["kept"] + sum(report["dropped"].values()) == report["candidates"]
    del c
    pa.default_memory_pool().release_unused()  # Arrow's temporaries go back to the system, not to the pool
    return index, report


# -- what the rules read: per-recording arrays, gathered once ----------------------------------------------------
@dataclass(frozen=True)
class _Stream:
    """One requested stream across the recordings (arrays of the recordings' length): whether each has it, its
    ``[t_start, t_end]`` (ns) and ``rate_hz`` (0 where none is recorded)."""

    present: np.ndarray  # bool
    t_start: np.ndarray  # int64
    t_end: np.ndarray  # int64
    rate: np.ndarray  # float64


@dataclass(frozen=True)
class _Recordings:
    """The recordings to cut, in order: ids and splits (Arrow strings), each requested stream (``_Stream``) and
    the span ``[start, end]`` (ns) covered by all of a recording's requested non-text streams (all its non-event
    streams when it has none of them; ``has_span`` False when it has no such stream either)."""

    ids: pa.Array
    split: pa.Array
    streams: dict[str, _Stream]
    start: np.ndarray
    end: np.ndarray
    has_span: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def read(cls, store: Store, mods: Modalities, recording_ids: list[str] | None) -> _Recordings:
        if recording_ids is None:
            ids = store.recordings["recording_id"].combine_chunks().cast(pa.string())
        else:
            ids = pa.array(list(dict.fromkeys(recording_ids)), pa.string())
        n = len(ids)
        at = _positions(store.recordings["recording_id"], ids)  # the store's row of each id, -1: not in it
        split = store.recordings["split"].combine_chunks().cast(pa.string()).take(pa.array(at, mask=at < 0))
        st = store.streams
        pos = _positions(ids, st["recording_id"])  # each streams row's recording, -1: not cut
        names = np.asarray(st["stream"].to_numpy(zero_copy_only=False), dtype=object)
        t_start, t_end = _int64(st["t_start_ns"]), _int64(st["t_end_ns"])
        rate = np.asarray(pc.fill_null(st["rate_hz"], 0.0).to_numpy(zero_copy_only=False), dtype=np.float64)
        streams = {}
        for m in (*mods.timeseries, *mods.video):
            rows = np.flatnonzero((names == m) & (pos >= 0))
            s = _Stream(np.zeros(n, bool), np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.float64))
            for dst, src in ((s.t_start, t_start), (s.t_end, t_end), (s.rate, rate)):
                dst[pos[rows]] = src[rows]
            s.present[pos[rows]] = True
            streams[m] = s
        start, end, has = _fallback_span(st, pos, t_start, t_end, n)
        if streams:
            req = np.zeros(n, bool)
            req_start, req_end = np.full(n, np.iinfo(np.int64).min), np.full(n, np.iinfo(np.int64).max)
            for s in streams.values():
                req |= s.present
                req_start = np.where(s.present, np.maximum(req_start, s.t_start), req_start)
                req_end = np.where(s.present, np.minimum(req_end, s.t_end), req_end)
            start, end, has = np.where(req, req_start, start), np.where(req, req_end, end), req | has
        return cls(ids, split, streams, np.where(has, start, 0), np.where(has, end, 0), has)


def _positions(values: pa.Array | pa.ChunkedArray, keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """For each of ``keys``, its (first) position in ``values`` (int64; -1 where absent)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return _int64(pc.fill_null(pc.index_in(keys, value_set=values), -1))


def _int64(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An integer column as int64 numpy (nulls as 0)."""
    return np.asarray(pc.fill_null(col, 0).to_numpy(zero_copy_only=False), dtype=np.int64)


def _fallback_span(st: pa.Table, pos: np.ndarray, t_start: np.ndarray, t_end: np.ndarray,
                   n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per recording: [max t_start, min t_end] of its non-event streams, and whether it has one."""
    kinds = np.asarray(st["kind"].to_numpy(zero_copy_only=False), dtype=object)
    rows = np.flatnonzero((kinds != "events") & (pos >= 0))
    start, end = np.full(n, np.iinfo(np.int64).min), np.full(n, np.iinfo(np.int64).max)
    np.maximum.at(start, pos[rows], t_start[rows])
    np.minimum.at(end, pos[rows], t_end[rows])
    return start, end, np.bincount(pos[rows], minlength=n)[:n] > 0


@dataclass(frozen=True)
class _Sources:
    """What the drop rules read besides the streams, sorted by recording: gaps per time series as (recording
    position, t_start_ns, t_end_ns); narrations (None unless text is requested) sorted by (recording, time, text)
    with their texts and per-recording offsets ``ev_off``; label segments (None without ``label_stream``) in the
    events table's order within each recording, with offsets ``lab_off``."""

    gaps: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    ev_t: np.ndarray | None = None
    ev_text: pa.Array | None = None
    ev_off: np.ndarray | None = None
    lab_a: np.ndarray | None = None
    lab_b: np.ndarray | None = None
    lab_text: pa.Array | None = None
    lab_off: np.ndarray | None = None

    @classmethod
    def read(cls, store: Store, spec: WindowSpec, mods: Modalities, recs: _Recordings) -> _Sources:
        n = len(recs)
        g = store.gaps
        gpos = _positions(recs.ids, g["recording_id"])
        names = np.asarray(g["stream"].to_numpy(zero_copy_only=False), dtype=object)
        gaps = {}
        for m in mods.timeseries:
            rows = np.flatnonzero((names == m) & (gpos >= 0))
            rows = rows[np.argsort(gpos[rows], kind="stable")]
            gaps[m] = gpos[rows], _int64(g["t_start_ns"])[rows], _int64(g["t_end_ns"])[rows]
        out: dict[str, Any] = {}
        if mods.text:
            ev = store.events(spec.text_stream)
            if "kind" in ev.column_names and spec.text_stream == "narrations":
                ev = ev.filter(pc.equal(ev["kind"], "narration"))
            t = pa.table({"rec": _positions(recs.ids, ev["recording_id"]), "t": ev["t_start_ns"],
                          "text": ev["text"].cast(pa.string())})
            t = t.filter(pc.greater_equal(t["rec"], 0))
            t = t.take(pc.sort_indices(t, [("rec", "ascending"), ("t", "ascending"), ("text", "ascending")]))
            out.update(ev_t=_int64(t["t"]), ev_text=t["text"].combine_chunks(), ev_off=_offsets(_int64(t["rec"]), n))
        if spec.label_stream is not None:
            lab = store.events(spec.label_stream)
            pos = _positions(recs.ids, lab["recording_id"])
            rows = np.flatnonzero(pos >= 0)
            rows = rows[np.argsort(pos[rows], kind="stable")]
            out.update(lab_a=_int64(lab["t_start_ns"])[rows], lab_b=_int64(lab["t_end_ns"])[rows],
                       lab_text=lab["text"].combine_chunks().cast(pa.string()).take(pa.array(rows, pa.int64())),
                       lab_off=_offsets(pos[rows], n))
        return cls(gaps, **out)


def _offsets(sorted_pos: np.ndarray, n: int) -> np.ndarray:
    """Offsets (n + 1, int64) of each recording's rows in rows sorted by recording position."""
    return np.concatenate([[0], np.cumsum(np.bincount(sorted_pos, minlength=n)[:n])]).astype(np.int64)


# -- the candidates -----------------------------------------------------------------------------------------------
@dataclass
class _Candidates:
    """Every recording's candidate windows ``[t0, t0 + sec)`` and their fate so far, as flat arrays ordered by
    recording then time: ``rec`` (the recording's position), ``off`` (each recording's first candidate), ``ev``
    (anchor="events": each candidate's narration), ``reason`` (0: kept, else 1 + the index in ``reasons`` of the
    first rule it failed). The rules fill ``frame_idx`` (video stream -> (n, frames) int32 frame indices),
    ``text_lo``/``text_hi`` (tile text: its narrations' range) and ``label`` (its segment, -1 for none)."""

    rec: np.ndarray  # int32
    off: np.ndarray  # int64, recordings + 1
    t0: np.ndarray  # int64 ns
    ev: np.ndarray | None
    too_short: tuple[int, bool] = (0, False)  # narrations of recordings shorter than a window; any such recording
    reason: np.ndarray = field(init=False)
    reasons: list[str] = field(default_factory=list)
    frame_idx: dict[str, np.ndarray] = field(default_factory=dict)
    text_lo: np.ndarray | None = None
    text_hi: np.ndarray | None = None
    label: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.reason = np.zeros(len(self.t0), dtype=np.uint16)

    @property
    def keep(self) -> np.ndarray:
        return self.reason == 0

    @property
    def n_candidates(self) -> int:
        return len(self.t0) + self.too_short[0]

    def drop(self, mask: np.ndarray, why: str, at: slice = slice(None)) -> None:
        """Drop the still-kept candidates (of ``at``, a slice of them) where ``mask`` holds, for reason ``why``."""
        if why not in self.reasons:
            self.reasons.append(why)
        r = self.reason[at]
        r[mask & (r == 0)] = self.reasons.index(why) + 1

    def dropped(self) -> dict[str, int]:
        """Dropped candidates per reason, sorted by reason (``recording_too_short`` listed, even at 0, whenever a
        recording was too short: the report has always shown it)."""
        counts = np.bincount(self.reason, minlength=len(self.reasons) + 1)
        out = {why: int(counts[k + 1]) for k, why in enumerate(self.reasons) if counts[k + 1]}
        if self.too_short[1]:
            out[REASON_TOO_SHORT] = self.too_short[0]
        return dict(sorted(out.items()))


def _cut_candidates(spec: WindowSpec, recs: _Recordings, src: _Sources) -> _Candidates:
    """The candidates of every recording with a span: tiles of ``stride`` over it, or one window centred on each
    narration and clamped into it (``_recording_too_short``: none from a recording shorter than a window)."""
    sec, n_rec = spec.sec_ns, len(recs)
    length = recs.end - recs.start
    if spec.anchor == "tile":
        ok = recs.has_span & (length >= sec)
        n = np.where(ok, (np.where(ok, length, sec) - sec) // spec.stride_ns + 1, 0)
        off = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
        t0 = np.repeat(recs.start - off[:-1] * spec.stride_ns, n)  # start + (k - off) * stride, in place
        k = np.arange(off[-1], dtype=np.int64)
        k *= spec.stride_ns
        t0 += k
        del k
        return _Candidates(np.repeat(np.arange(n_rec, dtype=np.int32), n), off, t0, None)
    short = _recording_too_short(spec, recs)
    n_ev = np.diff(src.ev_off)
    ok = recs.has_span & ~short
    ev = np.flatnonzero(np.repeat(ok, n_ev))
    rec = np.repeat(np.arange(n_rec, dtype=np.int32), np.where(ok, n_ev, 0))
    t0 = np.minimum(np.maximum(src.ev_t[ev] - sec // 2, recs.start[rec]), recs.end[rec] - sec)
    off = np.concatenate([[0], np.cumsum(np.where(ok, n_ev, 0))]).astype(np.int64)
    return _Candidates(rec, off, t0, ev, too_short=(int(n_ev[short].sum()), bool(short.any())))


def _recording_too_short(spec: WindowSpec, recs: _Recordings) -> np.ndarray:
    """Drop rule ``recording_too_short`` (anchor="events"): recordings whose span is shorter than one window,
    so every narration's window is dropped (tile mode simply cuts no candidate there)."""
    return recs.has_span & (recs.end - recs.start < spec.sec_ns)


def _apply_drop_rules(c: _Candidates, store: Store, spec: WindowSpec, mods: Modalities, recs: _Recordings,
                      src: _Sources) -> None:
    """Every drop rule, in this order: missing modality; per time series (in request order) not covered, then gap;
    per video stream too few frames, then not covered; no text; no label."""
    grid, frame_off = spec.grid_offsets_ns(), spec.frame_offsets_ns()
    _drop_missing_modality(c, mods, recs)
    for m in mods.timeseries:
        _drop_timeseries_not_covered(c, m, recs.streams[m], grid)
        _drop_gap(c, m, recs.streams[m], src.gaps[m], spec)
    for v in mods.video:
        s = recs.streams[v]
        c.frame_idx[v] = np.zeros((len(c.t0), len(frame_off)), dtype=np.int32)
        for r in np.flatnonzero(s.present & (np.diff(c.off) > 0)):
            at = slice(int(c.off[r]), int(c.off[r + 1]))
            pts, _ = store.video_index(recs.ids[r].as_py(), v)
            fps = float(s.rate[r]) or (NS / np.median(np.diff(pts)) if len(pts) > 1 else 1.0)
            _drop_too_few_frames(c, v, spec, fps, len(frame_off), at)
            c.frame_idx[v][at] = _drop_video_not_covered(c, v, pts, fps, spec, frame_off, at)
    if mods.text:
        _drop_no_text(c, spec, src)
    if src.lab_off is not None:
        _drop_no_label(c, src, spec.sec_ns)


def _drop_missing_modality(c: _Candidates, mods: Modalities, recs: _Recordings) -> None:
    """``missing_<m>``: the recording lacks a requested time series or video stream (every candidate)."""
    for m in (*mods.timeseries, *mods.video):
        c.drop(~recs.streams[m].present[c.rec], f"missing_{m}")


def _drop_timeseries_not_covered(c: _Candidates, m: str, s: _Stream, grid: np.ndarray) -> None:
    """``<m>_not_covered``: the window's sample grid (``t0 + grid``) leaves the stream's [t_start, t_end]."""
    out = c.t0 < (s.t_start - grid[0])[c.rec]  # t0 + grid[0] < t_start
    out |= c.t0 > (s.t_end - grid[-1])[c.rec]  # t0 + grid[-1] > t_end
    c.drop(s.present[c.rec] & out, f"{m}_not_covered")


def _drop_gap(c: _Candidates, m: str, s: _Stream, gaps: tuple[np.ndarray, np.ndarray, np.ndarray],
              spec: WindowSpec) -> None:
    """``<m>_gap``: more than ``max_masked_fraction`` of the window lies inside the stream's gaps (the ns of
    ``[t0, t0 + sec)`` inside each gap, summed over the gaps)."""
    sec = spec.sec_ns
    g_rec, a, b = gaps
    if not len(g_rec):
        return
    g_off = _offsets(g_rec, len(c.off) - 1)
    lo = _search_within(c.t0, c.off, a - sec, g_off, "right")  # the first window ending after the gap starts
    hi = _search_within(c.t0, c.off, b, g_off, "left")  # the first window starting at or after its end
    n = np.maximum(hi - lo, 0)  # the windows [lo, hi) overlap the gap; the others not at all
    g = np.repeat(np.arange(len(n)), n)
    w = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n - lo, n)
    masked = np.zeros(len(c.t0), dtype=np.int64)
    np.add.at(masked, w, np.clip(np.minimum(c.t0[w] + sec, b[g]) - np.maximum(c.t0[w], a[g]), 0, None))
    c.drop(s.present[c.rec] & (masked > spec.max_masked_fraction * sec), f"{m}_gap")


def _search_within(values: np.ndarray, v_off: np.ndarray, q: np.ndarray, q_off: np.ndarray, side: str) -> np.ndarray:
    """Positions in ``values`` of queries grouped like them: for the queries ``q[q_off[r]:q_off[r + 1]]`` of
    recording ``r``, ``v_off[r] + searchsorted(values[v_off[r]:v_off[r + 1]], q, side)`` (values ascending within
    each recording)."""
    out = np.repeat(v_off[:-1], np.diff(q_off))
    for r in np.flatnonzero((np.diff(v_off) > 0) & (np.diff(q_off) > 0)):
        qa, qb = q_off[r], q_off[r + 1]
        out[qa:qb] += np.searchsorted(values[v_off[r]:v_off[r + 1]], q[qa:qb], side)
    return out


def _drop_too_few_frames(c: _Candidates, v: str, spec: WindowSpec, fps: float, n_frames: int, at: slice) -> None:
    """``<v>_too_few_frames``: more frames than a window holds at this recording's rate would repeat frames
    (see ``frames_held``), so all of its windows go."""
    c.drop(np.full(at.stop - at.start, n_frames > frames_held(spec.sec, fps)), f"{v}_too_few_frames", at)


def _drop_video_not_covered(c: _Candidates, v: str, pts: np.ndarray, fps: float, spec: WindowSpec,
                            frame_off: np.ndarray, at: slice) -> np.ndarray:
    """``<v>_not_covered``: some target time ``t0 + frame_off`` has no frame within the tolerance (default half a
    frame period). Returns the nearest frame indices of the recording's candidates ``at``, (n, frames) int32."""
    t0 = c.t0[at]
    n_frames = len(frame_off)
    tol = round((spec.video_tolerance_sec if spec.video_tolerance_sec is not None else 0.5 / fps) * NS)
    idx = np.empty((len(t0), n_frames), dtype=np.int32)
    far = np.zeros(len(t0), dtype=bool)
    step = max(1, (1 << 20) // n_frames)  # targets in blocks of ~1M: bounded temporaries
    for a in range(0, len(t0), step):
        targets = t0[a:a + step, None] + frame_off[None, :]
        i, err = nearest_frames(pts, targets.ravel())
        far[a:a + step] = (err.reshape(targets.shape) > tol).any(axis=1)
        idx[a:a + step] = i.reshape(targets.shape)
    c.drop(far, f"{v}_not_covered", at)
    return idx


def _drop_no_text(c: _Candidates, spec: WindowSpec, src: _Sources) -> None:
    """``no_text`` (anchor="tile"): no narration starts inside the window. Each candidate's text is the list of
    its recording's narrations in ``[t0, t0 + sec)``, ``text_lo:text_hi`` (tile), or its own narration (events)."""
    if spec.anchor != "tile":
        return
    c.text_lo = _search_within(src.ev_t, src.ev_off, c.t0, c.off, "left")
    c.text_hi = _search_within(src.ev_t, src.ev_off, c.t0 + spec.sec_ns, c.off, "left")
    c.drop(c.text_hi == c.text_lo, "no_text")


def _drop_no_label(c: _Candidates, src: _Sources, sec: int) -> None:
    """``no_label``: no labelled segment overlaps the window. Each candidate's label is the segment of its
    recording overlapping ``[t0, t0 + sec)`` the most (ties: the earlier segment in the events table), or none."""
    c.label = np.full(len(c.t0), -1, dtype=np.int64)
    for r in np.flatnonzero((np.diff(src.lab_off) > 0) & (np.diff(c.off) > 0)):
        sa, sb = int(src.lab_off[r]), int(src.lab_off[r + 1])
        a, b = src.lab_a[None, sa:sb], src.lab_b[None, sa:sb]
        step = max(1, (1 << 20) // (sb - sa))  # (windows x segments) in blocks of ~1M
        for w in range(int(c.off[r]), int(c.off[r + 1]), step):
            t0 = c.t0[w:min(w + step, int(c.off[r + 1])), None]
            overlap = np.minimum(t0 + sec, b) - np.maximum(t0, a)
            best = np.argmax(overlap, axis=1)
            c.label[w:w + len(t0)] = np.where(overlap[np.arange(len(t0)), best] > 0, sa + best, -1)
    c.drop(c.label < 0, "no_label")


# -- the index table ----------------------------------------------------------------------------------------------
def _table(c: _Candidates, spec: WindowSpec, mods: Modalities, recs: _Recordings, src: _Sources,
           n_frames: int) -> pa.Table:
    """recording_id, split, t0_ns, t1_ns (+ text: a string per window for anchor="events", else a list;
    + label; + ``<video>_idx``: a list of ``n_frames`` int32 frame indices per video stream), kept windows only."""
    keep = c.keep
    kept = slice(None) if keep.all() else np.flatnonzero(keep)  # all kept: views, no copies
    rec = pa.array(c.rec[kept], pa.int32())
    t0 = c.t0[kept]
    cols = {"recording_id": recs.ids.take(rec), "split": recs.split.take(rec),
            "t0_ns": pa.array(t0, pa.int64()), "t1_ns": pa.array(t0 + spec.sec_ns, pa.int64())}
    schema = [("recording_id", pa.string()), ("split", pa.string()), ("t0_ns", pa.int64()), ("t1_ns", pa.int64())]
    if mods.text:
        if spec.anchor == "events":
            cols["text"] = src.ev_text.take(pa.array(c.ev[kept], pa.int64()))
        else:
            lo, n = c.text_lo[kept], c.text_hi[kept] - c.text_lo[kept]
            rows = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n - lo, n)
            offsets = pa.array(np.concatenate([[0], np.cumsum(n)]).astype(np.int32), pa.int32())
            cols["text"] = pa.ListArray.from_arrays(offsets, src.ev_text.take(pa.array(rows, pa.int64())))
        schema.append(("text", pa.string() if spec.anchor == "events" else pa.list_(pa.string())))
    if src.lab_off is not None:
        cols["label"] = src.lab_text.take(pa.array(c.label[kept], pa.int64()))
        schema.append(("label", pa.string()))
    for v in mods.video:
        flat = c.frame_idx[v][kept]
        offsets = pa.array(np.arange(len(flat) + 1, dtype=np.int32) * n_frames, pa.int32())
        cols[f"{v}_idx"] = pa.ListArray.from_arrays(offsets, pa.array(flat.ravel(), pa.int32()))
        schema.append((f"{v}_idx", pa.list_(pa.int32())))
    sch = pa.schema(schema)
    return pa.Table.from_arrays([cols[f.name].cast(f.type) for f in sch], schema=sch)


def _check_sizes(store: Store, spec: WindowSpec, mods: Modalities, recs: _Recordings, n_frames: int,
                 max_windows: int) -> None:
    """Refuse, before any per-window allocation, what would exceed the stated bounds or repeat frames."""
    if isinstance(max_windows, bool) or not isinstance(max_windows, numbers.Integral) or max_windows < 1:
        raise ValueError(f"max_windows must be a positive integer, got {repr_arg(max_windows)}")
    if spec.anchor == "tile":
        length = (recs.end - recs.start)[recs.has_span]
        length = length[length >= spec.sec_ns]
        n = sum(int(k) for k in (length - spec.sec_ns) // spec.stride_ns + 1)
    elif mods.video:
        n = store.events(spec.text_stream).num_rows  # one candidate per event at most
    else:
        n = 0
    arg = "stride" if spec.stride is not None else "sec"
    if spec.anchor == "tile" and n > max_windows:
        raise ValueError(f"{arg}={getattr(spec, arg)!r} would cut {n:,} windows from {len(recs)} recordings; at most "
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
        s = recs.streams[v]
        rates = s.rate[s.present & (s.rate != 0)]
        if len(rates) and n_frames > frames_held(spec.sec, float(rates.max())):
            fastest = float(rates.max())
            held = frames_held(spec.sec, fastest)
            arg = "frames" if spec.frames is not None else "video_fps"
            raise ValueError(f"{arg}={getattr(spec, arg)!r} asks {n_frames} frames per window, but a {spec.sec:g} s "
                             f"window holds only {held} frame(s) of {v!r} at {fastest:g} fps (its fastest "
                             f"recording); more would repeat frames. Ask at most {held} frames, or a longer sec")
