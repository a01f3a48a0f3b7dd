"""The window index: candidates cut from each recording's span, checked, and dropped with a reason.

See ``mmloader.windows.spec`` for the anchors and the drop reasons (``WindowSet.report()``).
"""

from __future__ import annotations

import numbers
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..store import Store
from ..video.select import nearest_frames
from .spec import MAX_FRAME_REFS, MAX_WINDOWS, NS, Modalities, WindowSpec, frames_held, repr_arg, resolve_modalities


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
    streams = store.streams.to_pylist()
    by_rec: dict[str, dict[str, dict[str, Any]]] = {}
    for row in streams:
        by_rec.setdefault(row["recording_id"], {})[row["stream"]] = row
    rec_ids = recording_ids if recording_ids is not None else store.recordings["recording_id"].to_pylist()
    spans = {rid: _span(by_rec.get(rid, {}), mods) for rid in rec_ids}
    n_frames = len(spec.frame_offsets_ns())
    _check_sizes(store, spec, mods, by_rec, spans, n_frames, MAX_WINDOWS if max_windows is None else max_windows)
    gaps: dict[tuple[str, str], np.ndarray] = {}
    for g in store.gaps.to_pylist():
        gaps.setdefault((g["recording_id"], g["stream"]), []).append((g["t_start_ns"], g["t_end_ns"]))
    events = None
    if mods.text:
        ev = store.events(spec.text_stream)
        if "kind" in ev.column_names:
            ev = ev.filter(pc.equal(ev["kind"], "narration")) if spec.text_stream == "narrations" else ev
        events = {}
        for rid, t, text in zip(ev["recording_id"].to_pylist(), ev["t_start_ns"].to_pylist(), ev["text"].to_pylist()):
            events.setdefault(rid, []).append((t, text))
    labels: dict[str, list[tuple[int, int, str]]] | None = None
    if spec.label_stream is not None:
        lab = store.events(spec.label_stream)
        labels = {}
        for rid, a, b, text in zip(lab["recording_id"].to_pylist(), lab["t_start_ns"].to_pylist(),
                                   lab["t_end_ns"].to_pylist(), lab["text"].to_pylist()):
            labels.setdefault(rid, []).append((a, b, text))
    splits = dict(zip(store.recordings["recording_id"].to_pylist(), store.recordings["split"].to_pylist()))

    dropped: Counter[str] = Counter()
    out: dict[str, list] = {"recording_id": [], "split": [], "t0_ns": [], "t1_ns": []}
    if mods.text:
        out["text"] = []
    if labels is not None:
        out["label"] = []
    for v in mods.video:
        out[f"{v}_idx"] = []
    n_candidates = 0
    sec = spec.sec_ns
    grid = spec.grid_offsets_ns()
    frame_off = spec.frame_offsets_ns()
    for rid in rec_ids:
        srows = by_rec.get(rid, {})
        if spans[rid] is None:
            continue
        start, end = spans[rid]
        rec_events = sorted(events.get(rid, [])) if events is not None else []
        if spec.anchor == "tile":
            n = (end - start - sec) // spec.stride_ns + 1 if end - start >= sec else 0
            t0 = start + np.arange(max(n, 0), dtype=np.int64) * spec.stride_ns
            texts = None
        else:
            centres = np.array([t for t, _ in rec_events], dtype=np.int64)
            texts = [x for _, x in rec_events]
            if end - start < sec:
                n_candidates += len(centres)
                dropped["recording_too_short"] += len(centres)
                continue
            t0 = np.clip(centres - sec // 2, start, end - sec)
        n_candidates += len(t0)
        keep = np.ones(len(t0), dtype=bool)
        reason = np.full(len(t0), "", dtype=object)

        def drop(mask: np.ndarray, why: str) -> None:
            m = mask & keep
            reason[m] = why
            keep[m] = False

        for m in (*mods.timeseries, *mods.video):
            if m not in srows:
                drop(np.ones(len(t0), bool), f"missing_{m}")
        for m in mods.timeseries:
            if m not in srows:
                continue
            s = srows[m]
            drop((t0 + grid[0] < s["t_start_ns"]) | (t0 + grid[-1] > s["t_end_ns"]), f"{m}_not_covered")
            masked = np.zeros(len(t0), dtype=np.int64)
            for a, b in gaps.get((rid, m), []):
                masked += np.clip(np.minimum(t0 + sec, b) - np.maximum(t0, a), 0, None)
            drop(masked > spec.max_masked_fraction * sec, f"{m}_gap")
        frame_idx = {}
        for v in mods.video:
            if v not in srows:
                continue
            pts, _ = store.video_index(rid, v)
            fps = srows[v]["rate_hz"] or (NS / np.median(np.diff(pts)) if len(pts) > 1 else 1.0)
            # more frames than a window holds at this video's rate would repeat frames: those windows are dropped
            drop(np.full(len(t0), n_frames > frames_held(spec.sec, fps)), f"{v}_too_few_frames")
            tol = round((spec.video_tolerance_sec if spec.video_tolerance_sec is not None else 0.5 / fps) * NS)
            idx = np.empty((len(t0), n_frames), dtype=np.int32)
            far = np.zeros(len(t0), dtype=bool)
            step = max(1, (1 << 20) // n_frames)  # targets in blocks of ~1M: bounded temporaries
            for a in range(0, len(t0), step):
                targets = t0[a:a + step, None] + frame_off[None, :]
                i, err = nearest_frames(pts, targets.ravel())
                far[a:a + step] = (err.reshape(targets.shape) > tol).any(axis=1)
                idx[a:a + step] = i.reshape(targets.shape)
            drop(far, f"{v}_not_covered")
            frame_idx[v] = idx
        window_text: list[Any] = []
        if mods.text and spec.anchor == "tile":
            ts_ev = np.array([t for t, _ in rec_events], dtype=np.int64)
            lo = np.searchsorted(ts_ev, t0, side="left")
            hi = np.searchsorted(ts_ev, t0 + sec, side="left")
            window_text = [[rec_events[j][1] for j in range(a, b)] for a, b in zip(lo, hi)]
            drop(hi == lo, "no_text")
        elif mods.text:
            window_text = texts
        window_label: list[str | None] = []
        if labels is not None:
            window_label = [_covering_label(labels.get(rid, []), int(a), int(a) + sec) for a in t0]
            drop(np.array([lab is None for lab in window_label], dtype=bool), "no_label")
        dropped.update(r for r in reason[~keep])
        kept = np.flatnonzero(keep)
        out["recording_id"].extend([rid] * len(kept))
        out["split"].extend([splits.get(rid)] * len(kept))
        out["t0_ns"].append(t0[kept])  # numpy blocks, concatenated once: ~8 B per window, not a Python int each
        out["t1_ns"].append(t0[kept] + sec)
        if mods.text:
            out["text"].extend(window_text[i] for i in kept)
        if labels is not None:
            out["label"].extend(window_label[i] for i in kept)
        for v in mods.video:
            out[f"{v}_idx"].append(frame_idx[v][kept] if v in frame_idx else np.empty((0, n_frames), np.int32))
    schema = [("recording_id", pa.string()), ("split", pa.string()), ("t0_ns", pa.int64()), ("t1_ns", pa.int64())]
    if mods.text:
        schema.append(("text", pa.string() if spec.anchor == "events" else pa.list_(pa.string())))
    if labels is not None:
        schema.append(("label", pa.string()))
    schema += [(f"{v}_idx", pa.list_(pa.int32())) for v in mods.video]
    for name in ("t0_ns", "t1_ns"):
        out[name] = pa.array(np.concatenate(out[name]) if out[name] else np.empty(0, np.int64), pa.int64())
    for v in mods.video:
        flat = np.concatenate(out[f"{v}_idx"]) if out[f"{v}_idx"] else np.empty((0, n_frames), np.int32)
        offsets = pa.array(np.arange(len(flat) + 1, dtype=np.int32) * n_frames, pa.int32())
        out[f"{v}_idx"] = pa.ListArray.from_arrays(offsets, pa.array(flat.ravel(), pa.int32()))
    index = pa.Table.from_pydict(out, schema=pa.schema(schema))
    report = {
        "candidates": n_candidates,
        "kept": index.num_rows,
        "dropped": dict(sorted(dropped.items())),
        "recordings": len(set(out["recording_id"])),
    }
    assert report["kept"] + sum(report["dropped"].values()) == n_candidates
    return index, report


def _span(srows: dict[str, dict[str, Any]], mods: Modalities) -> tuple[int, int] | None:
    """[start, end] covered by all of a recording's requested non-text streams (all its non-event streams when
    only text is requested), or None when it has none of them."""
    span_streams = [srows[m] for m in (*mods.timeseries, *mods.video) if m in srows] or [
        s for s in srows.values() if s["kind"] != "events"
    ]
    if not span_streams:
        return None
    return max(s["t_start_ns"] for s in span_streams), min(s["t_end_ns"] for s in span_streams)


def _check_sizes(store: Store, spec: WindowSpec, mods: Modalities, by_rec: dict[str, dict[str, dict[str, Any]]],
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
