"""Window specs and the window index: every check happens here, once, never inside a worker.

A window is ``[t0, t1)`` on one recording's clock (int64 ns), ``t1 = t0 + sec``.

=============  ==================================================================================
anchor         candidates
=============  ==================================================================================
``tile``       ``t0 = start + k * stride`` for k = 0, 1, ... while ``t0 + sec <= end``, where
               [start, end] is the span covered by all of the recording's requested non-text streams
               (their intersection: a window needs every modality).
               ``sec=5, stride=None`` → 0–5 s, 5–10 s, ...; ``sec=5, stride=2.5`` → 0–5, 2.5–7.5, ...
``events``     one window centred on each narration (``text_stream``), clamped into [start, end]:
               a narration at 1.0 s with ``sec=5`` gives 0–5 s, not -1.5–3.5 s.
=============  ==================================================================================

Candidates that fail a check are dropped and counted per reason (``WindowSet.report()``):
``missing_<modality>`` (the recording lacks it), ``recording_too_short``, ``<ts>_not_covered`` (the
grid leaves the stream), ``<ts>_gap`` (more than ``max_masked_fraction`` of the window inside gaps),
``video_not_covered`` (a target time has no frame within the tolerance), ``no_text`` (tile mode
with ``text`` requested and no narration in the window), ``no_label`` (``label_stream`` given and no
labelled segment overlaps the window).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .store import Store
from .video.select import nearest_frames

NS = 1_000_000_000


@dataclass(frozen=True)
class WindowSpec:
    """What windows to cut and how to read them. Seconds at this edge; ns inside."""

    sec: float
    stride: float | None = None
    modalities: tuple[str, ...] = ("imu",)
    anchor: str = "tile"
    imu_hz: float = 200.0
    frames: int | None = None
    video_fps: float | None = None
    size: tuple[int, int] | None = None  # (height, width) of decoded frames
    text_stream: str = "narrations"
    label_stream: str | None = None  # events whose segment covering most of the window becomes its `label`
    video_tolerance_sec: float | None = None  # default: half a frame period
    max_masked_fraction: float = 0.25
    video_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.sec <= 0:
            raise ValueError(f"sec must be > 0, got {self.sec}")
        if self.stride is not None and self.stride <= 0:
            raise ValueError(f"stride must be > 0, got {self.stride}")
        if self.anchor not in ("tile", "events"):
            raise ValueError(f"anchor must be 'tile' or 'events', got {self.anchor!r}")
        if self.imu_hz <= 0:
            raise ValueError(f"imu_hz must be > 0, got {self.imu_hz}")
        if self.frames is not None and self.video_fps is not None:
            raise ValueError("give frames= or video_fps=, not both")
        if self.frames is not None and self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if not 0 <= self.max_masked_fraction <= 1:
            raise ValueError("max_masked_fraction must be in [0, 1]")

    @property
    def sec_ns(self) -> int:
        return round(self.sec * NS)

    @property
    def stride_ns(self) -> int:
        return round((self.stride if self.stride is not None else self.sec) * NS)

    @property
    def num_samples(self) -> int:
        """IMU samples per window: ``round(sec * imu_hz)`` on the grid ``t0 + k / imu_hz``."""
        return int(round(self.sec * self.imu_hz))

    def grid_offsets_ns(self) -> np.ndarray:
        return np.round(np.arange(self.num_samples) * (NS / self.imu_hz)).astype(np.int64)

    def frame_offsets_ns(self) -> np.ndarray:
        """Requested frame times relative to t0: ``frames=F`` → centres of F equal parts; ``video_fps=r`` →
        ``k / r``; neither → one centre frame."""
        if self.video_fps is not None:
            n = max(1, int(round(self.sec * self.video_fps)))
            return np.round(np.arange(n) * (NS / self.video_fps)).astype(np.int64)
        n = self.frames or 1
        return np.round((np.arange(n) + 0.5) * (self.sec_ns / n)).astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Modalities:
    """The requested modalities resolved against the store: time series, video, text."""

    timeseries: tuple[str, ...]
    video: tuple[str, ...]
    text: bool


def resolve_modalities(store: Store, spec: WindowSpec) -> Modalities:
    kinds = dict(zip(store.streams["stream"].to_pylist(), store.streams["kind"].to_pylist()))
    ts, video, text = [], [], False
    for m in spec.modalities:
        if m == "text" or (m == spec.text_stream and kinds.get(m) == "events"):
            if spec.text_stream not in kinds:
                raise ValueError(f"{store.url}: text requested but the store has no '{spec.text_stream}' events "
                                 f"(modalities: {sorted(kinds)})")
            text = True
        elif kinds.get(m) == "timeseries":
            ts.append(m)
        elif kinds.get(m) == "video":
            video.append(m)
        else:
            raise ValueError(f"{store.url}: unknown modality {m!r}; this store has {sorted(kinds)} (and 'text')")
    if spec.anchor == "events" and not text:
        text = True  # events windows carry their narration
    return Modalities(tuple(ts), tuple(video), text)


def build_index(store: Store, spec: WindowSpec, recording_ids: list[str] | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """The window index (one row per kept window) and the report of every candidate's fate."""
    mods = resolve_modalities(store, spec)
    streams = store.streams.to_pylist()
    by_rec: dict[str, dict[str, dict[str, Any]]] = {}
    for row in streams:
        by_rec.setdefault(row["recording_id"], {})[row["stream"]] = row
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
    rec_ids = recording_ids if recording_ids is not None else store.recordings["recording_id"].to_pylist()

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
        span_streams = [srows[m] for m in (*mods.timeseries, *mods.video) if m in srows] or [
            s for s in srows.values() if s["kind"] != "events"
        ]
        if not span_streams:
            continue
        start = max(s["t_start_ns"] for s in span_streams)
        end = min(s["t_end_ns"] for s in span_streams)
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
            tol = round((spec.video_tolerance_sec if spec.video_tolerance_sec is not None else 0.5 / fps) * NS)
            targets = t0[:, None] + frame_off[None, :]
            idx, err = nearest_frames(pts, targets.ravel())
            drop((err.reshape(targets.shape) > tol).any(axis=1), f"{v}_not_covered")
            frame_idx[v] = idx.reshape(targets.shape).astype(np.int32)
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
        out["t0_ns"].extend(t0[kept].tolist())
        out["t1_ns"].extend((t0[kept] + sec).tolist())
        if mods.text:
            out["text"].extend(window_text[i] for i in kept)
        if labels is not None:
            out["label"].extend(window_label[i] for i in kept)
        for v in mods.video:
            out[f"{v}_idx"].extend(frame_idx[v][kept].tolist() if v in frame_idx else [])
    schema = [("recording_id", pa.string()), ("split", pa.string()), ("t0_ns", pa.int64()), ("t1_ns", pa.int64())]
    if mods.text:
        schema.append(("text", pa.string() if spec.anchor == "events" else pa.list_(pa.string())))
    if labels is not None:
        schema.append(("label", pa.string()))
    schema += [(f"{v}_idx", pa.list_(pa.int32())) for v in mods.video]
    index = pa.Table.from_pydict(out, schema=pa.schema(schema))
    report = {
        "candidates": n_candidates,
        "kept": index.num_rows,
        "dropped": dict(sorted(dropped.items())),
        "recordings": len(set(out["recording_id"])),
    }
    assert report["kept"] + sum(report["dropped"].values()) == n_candidates
    return index, report


def _covering_label(segments: list[tuple[int, int, str]], t0: int, t1: int) -> str | None:
    """The text of the segment overlapping ``[t0, t1)`` the most (ties: the earlier segment), or None."""
    best, best_overlap = None, 0
    for a, b, text in segments:
        overlap = min(t1, b) - max(t0, a)
        if overlap > best_overlap:
            best, best_overlap = text, overlap
    return best
