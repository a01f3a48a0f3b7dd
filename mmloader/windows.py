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
``video_not_covered`` (a target time has no frame within the tolerance), ``video_too_few_frames`` (the
recording's video holds fewer frames per window than requested; see ``frames_held``), ``no_text`` (tile mode
with ``text`` requested and no narration in the window), ``no_label`` (``label_stream`` given and no
labelled segment overlaps the window).
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .store import Store
from .video.select import nearest_frames

NS = 1_000_000_000

# -- bounds on the arguments (docs/windows.md, "Options and their limits"): each keeps a call's memory bounded --
MAX_SEC = 86_400.0  # sec and stride: one day at most (keeps t0 + sec far from int64 overflow)
MAX_IMU_HZ = 1_000_000.0  # imu_hz: a grid step of at least 1 µs
MAX_SAMPLES_PER_WINDOW = 1_000_000  # round(sec * imu_hz): one window's grid is 8 MB of int64 offsets, and its
#                                     6-channel float32 array 24 MB; a batch of 64 of those is 1.5 GB
MAX_FRAMES_PER_WINDOW = 1_000  # frames, or round(sec * video_fps): 1000 uint8 frames at 224x224 are 150 MB
MAX_FRAME_SIDE = 8_192  # size=(H, W): each side in [1, 8192] (an 8192² RGB frame is 200 MB)
MAX_WINDOWS = 10_000_000  # windows one index may hold (about 100 B each while it is built: ~1 GB); counted from
#                           the recordings' spans before anything is allocated. windows(max_windows=N) raises it.
MAX_FRAME_REFS = 100_000_000  # windows x frames x video streams: frame indices in one index (400 MB as int32)
VIDEO_BACKENDS = ("auto", "pyav", "decord", "torchcodec")


def _r(value: Any) -> str:
    """``repr`` cut to 60 characters (an argument may be a 400-digit integer or a huge list)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_number(name: str, value: Any, *, integer: bool = False, none_ok: bool = False) -> None:
    """TypeError unless ``value`` is a (finite) real number, or an integer with ``integer=True``; names ``name``."""
    if value is None and none_ok:
        return
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if integer else "a number"
        raise TypeError(f"{name} must be {what}{' or None' if none_ok else ''}, got {type(value).__name__} {_r(value)}")
    if not integer and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {_r(value)}")


def _check_range(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, why: str = "") -> None:
    low_ok = value > lo if lo_open else value >= lo
    if not (low_ok and value <= hi):
        bound = f"{'>' if lo_open else '>='} {lo:g} and <= {hi:g}"
        raise ValueError(f"{name} must be {bound}{why}, got {_r(value)}")


def _modalities_tuple(value: Any) -> tuple[str, ...]:
    """``"imu"`` → ``("imu",)`` (one string is one modality); any other iterable of strings → a tuple."""
    if isinstance(value, str):
        value = (value,)
    try:
        out = tuple(value)
    except TypeError:
        raise TypeError(f"modalities must be a string or a sequence of strings, got {type(value).__name__} "
                        f"{_r(value)}") from None
    bad = [m for m in out if not isinstance(m, str)]
    if bad:
        raise TypeError(f"modalities must be strings, got {_r(bad[0])} ({type(bad[0]).__name__})")
    if not out:
        raise ValueError("modalities is empty: name at least one (e.g. ['imu'])")
    dup = sorted(m for m, k in Counter(out).items() if k > 1)
    if dup:
        raise ValueError(f"modalities names {dup[0]!r} more than once: {list(out)}")
    return out


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
        """Every argument checked here, before any store is read: types, finiteness and the bounds above.
        ``modalities="imu"`` is one modality; ``size`` may be any pair and is kept as a tuple."""
        object.__setattr__(self, "modalities", _modalities_tuple(self.modalities))
        _check_number("sec", self.sec)
        _check_range("sec", self.sec, 0, MAX_SEC, lo_open=True, why=" seconds")
        _check_number("stride", self.stride, none_ok=True)
        if self.stride is not None:
            _check_range("stride", self.stride, 1e-9, MAX_SEC, why=" seconds (1 ns is the time base)")
        if not isinstance(self.anchor, str) or self.anchor not in ("tile", "events"):
            raise ValueError(f"anchor must be 'tile' or 'events', got {_r(self.anchor)}")
        _check_number("imu_hz", self.imu_hz)
        _check_range("imu_hz", self.imu_hz, 0, MAX_IMU_HZ, lo_open=True, why=" Hz")
        n = self.sec * self.imu_hz
        if round(n) < 1:
            raise ValueError(f"sec={self.sec!r} is shorter than one sample at imu_hz={self.imu_hz:g}: a window holds "
                             f"at least one grid sample, so sec must be >= 1/imu_hz = {1 / self.imu_hz:g} s")
        if round(n) > MAX_SAMPLES_PER_WINDOW:
            raise ValueError(f"imu_hz={self.imu_hz:g} with sec={self.sec:g} asks {round(n):,} samples per window; "
                             f"at most "
                             f"{MAX_SAMPLES_PER_WINDOW:,} (sec * imu_hz) keep a window's arrays bounded "
                             f"(a 6-channel float32 window of 10^6 samples is 24 MB)")
        if self.frames is not None and self.video_fps is not None:
            raise ValueError("give frames= or video_fps=, not both")
        _check_number("frames", self.frames, integer=True, none_ok=True)
        if self.frames is not None:
            _check_range("frames", self.frames, 1, MAX_FRAMES_PER_WINDOW, why=" frames per window")
        _check_number("video_fps", self.video_fps, none_ok=True)
        if self.video_fps is not None:
            _check_range("video_fps", self.video_fps, 0, 1e6, lo_open=True, why=" Hz")
            if round(self.sec * self.video_fps) > MAX_FRAMES_PER_WINDOW:
                raise ValueError(f"video_fps={self.video_fps:g} with sec={self.sec:g} asks "
                                 f"{round(self.sec * self.video_fps):,} frames per window; at most "
                                 f"{MAX_FRAMES_PER_WINDOW} (sec * video_fps)")
        if self.size is not None:
            size = self.size
            if isinstance(size, (str, bytes)) or not hasattr(size, "__len__") or len(size) != 2:
                raise TypeError(f"size must be (height, width), two integers, got {_r(size)}")
            for side in size:
                if isinstance(side, bool) or not isinstance(side, numbers.Integral):
                    raise TypeError(f"size must be (height, width), two integers, got {_r(size)}")
                if not 1 <= side <= MAX_FRAME_SIDE:
                    raise ValueError(f"size must be (height, width) with each side in [1, {MAX_FRAME_SIDE}], "
                                     f"got {_r(size)}")
            object.__setattr__(self, "size", (int(size[0]), int(size[1])))
        if not isinstance(self.text_stream, str) or not self.text_stream:
            raise TypeError(f"text_stream must be a non-empty string, got {_r(self.text_stream)}")
        if self.label_stream is not None and (not isinstance(self.label_stream, str) or not self.label_stream):
            raise TypeError(f"label_stream must be a non-empty string or None, got {_r(self.label_stream)}")
        _check_number("video_tolerance_sec", self.video_tolerance_sec, none_ok=True)
        if self.video_tolerance_sec is not None:
            _check_range("video_tolerance_sec", self.video_tolerance_sec, 0, MAX_SEC, why=" seconds")
        _check_number("max_masked_fraction", self.max_masked_fraction)
        _check_range("max_masked_fraction", self.max_masked_fraction, 0, 1)
        if not isinstance(self.video_backend, str) or self.video_backend not in VIDEO_BACKENDS:
            raise ValueError(f"video_backend must be one of {', '.join(VIDEO_BACKENDS)}, got {_r(self.video_backend)}")

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


def check_split(store: Store, name: Any) -> None:
    """ValueError naming ``split`` and listing the store's splits unless ``name`` is one of them."""
    have = sorted({s for s in store.recordings["split"].to_pylist() if s is not None})
    if not isinstance(name, str):
        raise TypeError(f"split must be a string (one of {have}), got {type(name).__name__} {_r(name)}")
    if name not in have:
        raise ValueError(f"split={name!r} is not a split of {store.url}; it has {have}")


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
        if spec.text_stream not in kinds:
            raise ValueError(f"{store.url}: anchor='events' centres windows on '{spec.text_stream}' events, which this "
                             f"store lacks (text_stream=; it has {sorted(kinds)})")
        text = True  # events windows carry their narration
    return Modalities(tuple(ts), tuple(video), text)


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


def frames_held(sec: float, fps: float) -> int:
    """Frames that every window of ``sec`` seconds holds at ``fps`` (at least 1: one centre frame always fits).

    A window may hold one more, depending on its phase; asking more than this number can repeat a frame."""
    return max(1, math.floor(sec * fps + 1e-6))


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
        raise ValueError(f"max_windows must be a positive integer, got {_r(max_windows)}")
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
