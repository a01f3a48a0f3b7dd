"""Window specs: what a window is, every argument checked here, once, never inside a worker.

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
``video_too_few_frames`` (the recording's video holds fewer frames per window than requested; see
``frames_held``), ``video_not_covered`` (a target time has no frame within the tolerance), ``no_text`` (tile
mode with ``text`` requested and no narration in the window), ``no_label`` (``label_stream`` given and no
labelled segment overlaps the window). Each reason is one rule in ``mmloader.windows.index``, applied in this
order (time series and video streams in the order requested); a window counts under the first rule it fails.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..store import Store

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


def repr_arg(value: Any) -> str:
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
        raise TypeError(f"{name} must be {what}{' or None' if none_ok else ''}, got {type(value).__name__} {repr_arg(value)}")
    if not integer and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {repr_arg(value)}")


def _check_range(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, why: str = "") -> None:
    low_ok = value > lo if lo_open else value >= lo
    if not (low_ok and value <= hi):
        bound = f"{'>' if lo_open else '>='} {lo:g} and <= {hi:g}"
        raise ValueError(f"{name} must be {bound}{why}, got {repr_arg(value)}")


def _modalities_tuple(value: Any) -> tuple[str, ...]:
    """``"imu"`` → ``("imu",)`` (one string is one modality); any other iterable of strings → a tuple."""
    if isinstance(value, str):
        value = (value,)
    try:
        out = tuple(value)
    except TypeError:
        raise TypeError(f"modalities must be a string or a sequence of strings, got {type(value).__name__} "
                        f"{repr_arg(value)}") from None
    bad = [m for m in out if not isinstance(m, str)]
    if bad:
        raise TypeError(f"modalities must be strings, got {repr_arg(bad[0])} ({type(bad[0]).__name__})")
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
            raise ValueError(f"anchor must be 'tile' or 'events', got {repr_arg(self.anchor)}")
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
                raise TypeError(f"size must be (height, width), two integers, got {repr_arg(size)}")
            for side in size:
                if isinstance(side, bool) or not isinstance(side, numbers.Integral):
                    raise TypeError(f"size must be (height, width), two integers, got {repr_arg(size)}")
                if not 1 <= side <= MAX_FRAME_SIDE:
                    raise ValueError(f"size must be (height, width) with each side in [1, {MAX_FRAME_SIDE}], "
                                     f"got {repr_arg(size)}")
            object.__setattr__(self, "size", (int(size[0]), int(size[1])))
        if not isinstance(self.text_stream, str) or not self.text_stream:
            raise TypeError(f"text_stream must be a non-empty string, got {repr_arg(self.text_stream)}")
        if self.label_stream is not None and (not isinstance(self.label_stream, str) or not self.label_stream):
            raise TypeError(f"label_stream must be a non-empty string or None, got {repr_arg(self.label_stream)}")
        _check_number("video_tolerance_sec", self.video_tolerance_sec, none_ok=True)
        if self.video_tolerance_sec is not None:
            _check_range("video_tolerance_sec", self.video_tolerance_sec, 0, MAX_SEC, why=" seconds")
        _check_number("max_masked_fraction", self.max_masked_fraction)
        _check_range("max_masked_fraction", self.max_masked_fraction, 0, 1)
        if not isinstance(self.video_backend, str) or self.video_backend not in VIDEO_BACKENDS:
            raise ValueError(f"video_backend must be one of {', '.join(VIDEO_BACKENDS)}, got {repr_arg(self.video_backend)}")

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
        raise TypeError(f"split must be a string (one of {have}), got {type(name).__name__} {repr_arg(name)}")
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


def frames_held(sec: float, fps: float) -> int:
    """Frames that every window of ``sec`` seconds holds at ``fps`` (at least 1: one centre frame always fits).

    A window may hold one more, depending on its phase; asking more than this number can repeat a frame."""
    return max(1, math.floor(sec * fps + 1e-6))
