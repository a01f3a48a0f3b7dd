"""The Project Aria recipe: VRS recordings (AEA layout) → store.

Reads (``ROOT`` is one recording, or holds one sub-folder per recording)::

    <recording>/recording.vrs        (or the folder's only *.vrs, e.g. ADT's video.vrs)
    <recording>/metadata.json        optional: kept as the recording's meta_json
    <recording>/speech.csv           optional: startTime_ns,endTime_ns,written,confidence (one word a row)
    <recording>/mps/                 optional: listed in the report, not read by this recipe version

Clock: VRS ``DEVICE_TIME`` (int64 ns; it does not start at 0). Every stream is resolved by its *label*
(``imu-right``, ``imu-left``, ``camera-rgb``), never by its numeric stream id.

Streams written per recording:

=============  ==========  ===================================================================================
stream         kind        what
=============  ==========  ===================================================================================
``imu_right``  timeseries  label ``imu-right`` (~1000 Hz): accl_x..z m/s^2, gyro_x..z rad/s
``imu_left``   timeseries  label ``imu-left`` (~800 Hz), same channels
``imu``        timeseries  an alias row of ``imu_right`` (``imu="right"`` or ``"both"``) or ``imu_left``
                           (``imu="left"``): the same Zarr group, no copy
``video``      video       label ``camera-rgb`` transcoded once into ``media/<rec>/camera-rgb.mp4`` inside the
                           store: H.264, fixed GOP (``gop_sec``), rotated upright (``rotate``), resized
                           (``rgb_size``), each frame's pts = its capture time on DEVICE_TIME
``narrations`` events      ``speech.csv`` words grouped into sentences (kind ``narration``)
=============  ==========  ===================================================================================

The prepare report (``reports/prepare.json``) says, per recording, which labels were found, what was fixed,
dropped or absent, the measured rates, frames, rotation and speech counts.
"""

from __future__ import annotations

import csv
import functools
import glob
import json
import os
import re
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable

import numpy as np
from tqdm.auto import tqdm

from ...errors import SourceFormatError, StoreFormatError
from ...fsutil import join, normalize_url
from ...store.writer import StoreWriter, check_recording_id
from ...video.probe import media_identity, probe_video, ticks_to_ns
from .. import imu as _imu
from ..base import Prepare, check_errors, count_totals, source_digest
from ..imu import CHANNELS, NS, UNITS, find_gaps, gaps_relative_sec, median_period_ns, sort_dedupe
from ..media import encode_into_store
from ..rows import RecordingRows, event_row, meta_json

RECIPE_VERSION = 1
IMU_LABELS = {"imu_right": "imu-right", "imu_left": "imu-left"}  # stream name → VRS label
RGB_LABEL = "camera-rgb"
SPEECH_COLUMNS = ("startTime_ns", "endTime_ns", "written", "confidence")
SENTENCE_END = re.compile(r"[.?!…]['\")\]]*$")


# -- projectaria-tools, imported lazily ---------------------------------------------------------------
def _aria() -> Any:
    """``projectaria_tools.core.data_provider``; a clear ImportError when the package is missing."""
    try:
        from projectaria_tools.core import data_provider
    except ImportError as e:
        raise ImportError(
            "the 'aria' recipe reads VRS files with projectaria-tools, which is not installed: "
            "pip install projectaria-tools  (or: pip install 'mmloader[aria]')"
        ) from e
    return data_provider


def open_vrs(path: str) -> Any:
    """A ``VrsDataProvider`` for ``path``; SourceFormatError naming the file when it cannot be read."""
    data_provider = _aria()
    if not os.path.isfile(path):
        raise SourceFormatError(path, "file not found", "a Project Aria .vrs recording")
    provider = data_provider.create_vrs_data_provider(path)
    if provider is None:
        raise SourceFormatError(path, "projectaria_tools cannot open it as a VRS recording (corrupt, truncated "
                                "or not a VRS file)", "a readable Project Aria .vrs recording")
    return provider


def stream_labels(provider: Any) -> list[str]:
    """The labels of every stream of a VRS file (e.g. ``camera-rgb``, ``imu-right``), sorted."""
    out = []
    for sid in provider.get_all_streams():
        label = provider.get_label_from_stream_id(sid)
        if label:
            out.append(str(label))
    return sorted(out)


# -- layout --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AriaRecordingFiles:
    """The files of one recording folder (local paths; sidecars are None when absent)."""

    recording_id: str
    folder: str
    vrs: str
    metadata: str | None
    speech: str | None
    mps: str | None

    def source_files(self) -> list[str]:
        return [p for p in (self.vrs, self.metadata, self.speech) if p is not None]


def check_id(files: AriaRecordingFiles) -> str:
    """The recording id (its folder's name) if it is a safe store id (``check_recording_id``), else a
    SourceFormatError naming the folder."""
    try:
        return check_recording_id(files.recording_id, "recording id (the folder name)")
    except StoreFormatError as e:
        raise SourceFormatError(files.folder, str(e), "a folder name usable as a recording id") from None


def _vrs_in(folder: str) -> str | None:
    """``recording.vrs`` or the folder's only ``*.vrs``; None when there is none; error when ambiguous."""
    if os.path.isfile(os.path.join(folder, "recording.vrs")):
        return os.path.join(folder, "recording.vrs")
    found = sorted(glob.glob(os.path.join(folder, "*.vrs")))
    if len(found) > 1:
        raise SourceFormatError(folder, f"{len(found)} .vrs files and no recording.vrs "
                                f"({', '.join(os.path.basename(f) for f in found)})",
                                "one recording.vrs (or a single *.vrs) per recording folder")
    return found[0] if found else None


def _recording_files(folder: str, vrs: str) -> AriaRecordingFiles:
    def opt(name: str) -> str | None:
        p = os.path.join(folder, name)
        return p if os.path.exists(p) else None

    return AriaRecordingFiles(recording_id=os.path.basename(folder.rstrip("/")), folder=folder, vrs=vrs,
                              metadata=opt("metadata.json"), speech=opt("speech.csv"), mps=opt("mps"))


class AriaLayout:
    """The recordings under ``root``: ROOT itself (it holds a .vrs), or one per sub-folder holding one.

    ``root`` may also be a ``.vrs`` file: one recording named after its folder. Local paths only
    (projectaria-tools reads local files).
    """

    def __init__(self, root: str | os.PathLike):
        url = normalize_url(root)
        if "://" in url:
            raise SourceFormatError(url, "the aria recipe reads local folders only", "a local path")
        self.root = url
        self.skipped: dict[str, str] = {}
        if os.path.isfile(url) and url.endswith(".vrs"):
            self.recordings = [_recording_files(os.path.dirname(url), url)]
            return
        if not os.path.isdir(url):
            raise SourceFormatError(url, "no such directory", "a folder of Project Aria recordings")
        vrs = _vrs_in(url)
        if vrs is not None:
            self.recordings = [_recording_files(url, vrs)]
            return
        recs = []
        for name in sorted(os.listdir(url)):
            sub = os.path.join(url, name)
            if name.startswith(".") or not os.path.isdir(sub):
                continue
            v = _vrs_in(sub)
            if v is None:
                self.skipped[name] = "no .vrs file"
                continue
            recs.append(_recording_files(sub, v))
        if not recs:
            raise SourceFormatError(url, "no recording found", "recording.vrs (or one *.vrs) in ROOT or in its "
                                    "sub-folders, one per recording")
        self.recordings = recs


# -- IMU -----------------------------------------------------------------------------------------------
class ImuSeries(_imu.ImuSeries):
    """One IMU on DEVICE_TIME: ``t_ns (N,) int64`` strictly increasing, ``data (N, 6) float32`` (CHANNELS)."""

    @property
    def rate_hz(self) -> float:
        return float(self.report["nominal_rate_hz"])


def _affine(fn: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """``(A, b)`` with ``fn(x) == A @ x + b`` for a 3-vector map, or None if ``fn`` is not affine."""
    b = np.asarray(fn(np.zeros(3)), dtype=np.float64).reshape(3)
    a = np.stack([np.asarray(fn(e), dtype=np.float64).reshape(3) - b for e in np.eye(3)], axis=1)
    probe = np.array([0.37, -1.9, 12.5])
    want = np.asarray(fn(probe), dtype=np.float64).reshape(3)
    return (a, b) if np.allclose(a @ probe + b, want, rtol=1e-9, atol=1e-9) else None


def _rectify(values: np.ndarray, fn: Any) -> np.ndarray:
    """Apply a 3-vector calibration map to ``values (N, 3)``: vectorised when it is affine (it is for the
    factory IMU models: rectification matrix and bias), else sample by sample."""
    ab = _affine(fn)
    if ab is not None:
        a, b = ab
        return values @ a.T + b
    return np.stack([np.asarray(fn(v), dtype=np.float64).reshape(3) for v in values]) if len(values) else values


def read_imu(provider: Any, label: str, *, rectify: bool = False, gap_factor: float = 5.0,
             where: str = "") -> ImuSeries | None:
    """Read the IMU stream ``label`` (None when the file has no such label).

    Repairs, each counted in ``report``: samples flagged invalid or non-finite are dropped; rows are sorted
    by capture time (``reordered``); repeated timestamps keep the first row (``duplicate_timestamp``).
    ``rectify=True`` applies the factory calibration (``raw_to_rectified_accel/gyro`` of the device
    calibration's IMU calib). Gaps are periods > ``gap_factor`` × the median period.
    """
    sid = provider.get_stream_id_from_label(label)
    if sid is None:
        return None
    n = int(provider.get_num_data(sid))
    t = np.empty(n, dtype=np.int64)
    x = np.empty((n, 6), dtype=np.float64)
    ok = np.ones(n, dtype=bool)
    for i in range(n):
        s = provider.get_imu_data_by_index(sid, i)
        t[i] = s.capture_timestamp_ns
        x[i, :3] = s.accel_msec2
        x[i, 3:] = s.gyro_radsec
        ok[i] = bool(s.accel_valid) and bool(s.gyro_valid)
    dropped = {"invalid_flag": int((~ok).sum())}
    finite = np.isfinite(x).all(axis=1) & (t > 0)
    dropped["non_finite"] = int((ok & ~finite).sum())
    keep = ok & finite
    rows = sort_dedupe(t[keep], x[keep])
    t, (x,) = rows.t_ns, rows.columns
    fixed = {"reordered": rows.reordered, "duplicate_timestamp": rows.duplicates}
    if rectify and t.size:
        calib = provider.get_device_calibration()
        imu_calib = calib.get_imu_calib(label) if calib is not None else None
        if imu_calib is None:
            raise SourceFormatError(where or label, f"rectify=True but the file has no factory calibration for "
                                    f"'{label}'", "a VRS file with a device calibration")
        x[:, :3] = _rectify(x[:, :3], imu_calib.raw_to_rectified_accel)
        x[:, 3:] = _rectify(x[:, 3:], imu_calib.raw_to_rectified_gyro)
    report: dict[str, Any] = {"label": label, "samples_in_file": n, "samples": int(t.size), "dropped": dropped,
                              "fixed": fixed, "rectified": bool(rectify), "clock": "DEVICE_TIME"}
    gaps: list[tuple[int, int]] = []
    if t.size >= 2:
        period = median_period_ns(t)
        measured = NS / period
        report.update({"t_start_ns": int(t[0]), "t_end_ns": int(t[-1]), "measured_rate_hz": round(measured, 3),
                       "nominal_rate_hz": round(measured, 1), "median_period_ns": period,
                       "max_period_ns": int(np.diff(t).max())})
        gaps = find_gaps(t, gap_factor, period)
        report["gaps_sec"] = gaps_relative_sec(gaps, t[0])
    return ImuSeries(t_ns=t, data=x.astype(np.float32), gaps=gaps, report=report)


# -- RGB video -----------------------------------------------------------------------------------------
def mp4_time_base(t_last_ns: int) -> Fraction:
    """The finest ``1/10^k`` (k ≤ 9) in which ``t_last_ns`` survives ``mmloader.video.probe.ticks_to_ns`` exactly.

    While ``ticks_to_ns`` multiplies in int64 (ticks × 10^9 must fit), a DEVICE_TIME of ~86 s gets 1/10^8
    (10 ns) and a day-long device clock 1/10^5 (10 µs); once it computes without overflow, 1/10^9 (exact). The frame pts are the capture times rounded to this base; the report gives the
    largest rounding (``pts_rounding_max_ns``).
    """
    for k in range(9, 2, -1):
        den = 10**k
        ticks = int(t_last_ns) * den // NS
        exact = ticks * NS // den
        if int(ticks_to_ns(np.array([ticks], dtype=np.int64), Fraction(1, den))[0]) == exact:
            return Fraction(1, den)
    return Fraction(1, 1000)


def _rotation_k(rotate: int) -> int:
    """``np.rot90`` turns (counter-clockwise) for ``rotate`` degrees (positive = counter-clockwise)."""
    if rotate % 90:
        raise ValueError(f"rotate must be a multiple of 90 degrees, got {rotate}")
    return (rotate // 90) % 4


def _plane(frame: Any, i: int, h: int, w: int) -> np.ndarray:
    """Plane ``i`` of a frame as an (h, w) uint8 array (line padding removed)."""
    p = frame.planes[i]
    return np.frombuffer(p, dtype=np.uint8)[: p.line_size * h].reshape(h, p.line_size)[:, :w]


def rotate_yuv420p(frame: Any, k: int) -> Any:
    """A yuv420p ``av.VideoFrame`` rotated by ``k`` quarter turns counter-clockwise (``np.rot90``)."""
    import av

    h, w = frame.height, frame.width
    y = np.rot90(_plane(frame, 0, h, w), k)
    u = np.rot90(_plane(frame, 1, h // 2, w // 2), k)
    v = np.rot90(_plane(frame, 2, h // 2, w // 2), k)
    packed = np.concatenate([y.ravel(), u.ravel(), v.ravel()]).reshape(y.shape[0] * 3 // 2, y.shape[1])
    return av.VideoFrame.from_ndarray(packed, format="yuv420p")


class _RgbEncoder:
    """Writes RGB frames into an H.264 mp4 at a local path: each frame rotated by ``k`` quarter turns, resized
    to ``size=(H, W)`` (after rotation; None keeps the native size), with pts in ticks of ``tb``. The file is
    opened at the first frame, whose size decides the output's."""

    def __init__(self, path: str, tb: Fraction, fps: float, gop: int, k: int, size: tuple[int, int] | None,
                 crf: int, preset: str):
        self.path, self.tb, self.fps, self.gop, self.k, self.size = path, tb, fps, gop, k, size
        self.crf, self.preset = crf, preset
        self.native: tuple[int, int] | None = None
        self.out_hw: tuple[int, int] | None = None
        self.container: Any = None
        self.stream: Any = None

    def _open(self, arr: np.ndarray) -> None:
        import av

        self.native = (int(arr.shape[0]), int(arr.shape[1]))
        rot_hw = self.native if self.k % 2 == 0 else (self.native[1], self.native[0])
        self.out_hw = (int(self.size[0]), int(self.size[1])) if self.size is not None else rot_hw
        self.container = av.open(self.path, mode="w", format="mp4",
                                 options={"movie_timescale": str(self.tb.denominator)})
        stream = self.container.add_stream("libx264", rate=max(1, int(round(self.fps))))
        stream.height, stream.width = self.out_hw
        stream.pix_fmt = "yuv420p"
        stream.time_base = self.tb
        stream.codec_context.time_base = self.tb
        stream.options = {"crf": str(self.crf), "preset": self.preset, "g": str(self.gop),
                          "keyint_min": str(self.gop), "sc_threshold": "0", "bf": "0"}
        self.stream = stream

    def write(self, arr: np.ndarray, tick: int) -> None:
        """Encode one ``(H, W, 3)`` uint8 RGB frame at pts ``tick``."""
        import av

        if self.stream is None:
            self._open(arr)
        assert self.out_hw is not None
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
        pre_hw = self.out_hw if self.k % 2 == 0 else (self.out_hw[1], self.out_hw[0])  # size before the rotation
        if self.k or (frame.height, frame.width) != pre_hw:
            # resize and convert to the encoder's yuv420p in one swscale pass, then rotate the planes:
            # ~2x cheaper than rotating and resizing RGB (measured, docs/aria.md)
            frame = frame.reformat(width=pre_hw[1], height=pre_hw[0], format="yuv420p", interpolation="AREA")
            if self.k:
                frame = rotate_yuv420p(frame, self.k)
        frame.pts = tick
        frame.time_base = self.tb
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def flush(self) -> None:
        if self.stream is not None and self.container is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)

    def close(self) -> None:
        if self.container is not None:
            self.container.close()


def transcode_rgb(
    provider: Any,
    label: str,
    out_path: str,
    *,
    rotate: int = -90,
    size: tuple[int, int] | None = (704, 704),
    crf: int = 23,
    preset: str = "ultrafast",
    gop_sec: float = 0.5,
    progress: bool = False,
    desc: str = "",
) -> dict[str, Any] | None:
    """Decode the JPEG frames of ``label`` and encode them once into an H.264 mp4 at ``out_path`` (local).

    Each frame is rotated by ``rotate`` degrees (counter-clockwise positive; Aria's RGB camera is mounted
    sideways, ``-90`` makes it upright), resized to ``size=(H, W)`` (after rotation; None keeps the native
    size) and written with pts = its capture time on DEVICE_TIME (see ``mp4_time_base``). Keyframes every
    ``gop_sec`` seconds (at most 1 s), no B-frames. Frames whose capture time does not increase are dropped
    (counted). Returns the report, or None when the file has no such label.
    """
    sid = provider.get_stream_id_from_label(label)
    if sid is None:
        return None
    if not 0 < gop_sec <= 1.0:
        raise ValueError(f"gop_sec must be in (0, 1], got {gop_sec}")
    k = _rotation_k(rotate)
    n = int(provider.get_num_data(sid))
    last = int(provider.get_image_data_by_index(sid, n - 1)[1].capture_timestamp_ns) if n else 1
    tb = mp4_time_base(max(last, 1))
    try:
        nominal = float(provider.get_nominal_rate_hz(sid)) or 0.0
    except Exception:  # not every provider version has it; the measured rate is used then
        nominal = 0.0
    fps = nominal if nominal > 0 else 30.0
    gop = max(1, int(round(gop_sec * fps)))
    t0 = time.perf_counter()
    capture: list[int] = []
    dropped = {"non_increasing_time": 0, "empty_image": 0}
    encoder = _RgbEncoder(out_path, tb, fps, gop, k, size, crf, preset)
    try:
        for i in tqdm(range(n), desc=desc or f"transcode {label}", unit="frame", disable=not progress, leave=False):
            image, record = provider.get_image_data_by_index(sid, i)
            ts = int(record.capture_timestamp_ns)
            tick = ts * tb.denominator // NS
            if capture and (ts <= capture[-1] or tick <= capture[-1] * tb.denominator // NS):
                dropped["non_increasing_time"] += 1
                continue
            arr = image.to_numpy_array()
            if arr is None or arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
                dropped["empty_image"] += 1
                continue
            encoder.write(arr, tick)
            capture.append(ts)
        encoder.flush()
    finally:
        encoder.close()
    cap = np.asarray(capture, dtype=np.int64)
    native, out_hw = encoder.native, encoder.out_hw
    rep: dict[str, Any] = {
        "label": label, "frames_in_file": n, "frames": int(cap.size), "dropped": dropped,
        "native_size": list(native) if native else None, "size": list(out_hw) if out_hw else None,
        "rotate": rotate, "codec": "h264", "crf": crf, "preset": preset, "gop_frames": gop,
        "nominal_fps": nominal or None, "time_base": f"{tb.numerator}/{tb.denominator}",
        "clock": "DEVICE_TIME", "transcode_sec": round(time.perf_counter() - t0, 3),
        "capture_ns": cap,
    }
    if cap.size >= 2:
        rep["measured_fps"] = round(NS / float(np.median(np.diff(cap))), 3)
    return rep


# -- speech --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpeechWord:
    """One row of speech.csv: times in ns on DEVICE_TIME."""

    t_start_ns: int
    t_end_ns: int
    written: str
    confidence: float


def read_speech_csv(path: str) -> list[SpeechWord]:
    """The words of an AEA ``speech.csv`` (``startTime_ns,endTime_ns,written,confidence``), in file order."""
    words = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in SPEECH_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SourceFormatError(path, f"header {reader.fieldnames} lacks {missing}", ",".join(SPEECH_COLUMNS))
        for line, row in enumerate(reader, start=2):
            try:
                a, b = int(row["startTime_ns"]), int(row["endTime_ns"])
                conf = float(row["confidence"]) if row["confidence"] not in (None, "") else float("nan")
            except (TypeError, ValueError):
                raise SourceFormatError(path, f"line {line}: {row!r}", "integer startTime_ns/endTime_ns and a "
                                        "numeric confidence") from None
            for key, v in (("startTime_ns", a), ("endTime_ns", b)):
                if not 0 <= v <= 2**63 - 1:
                    raise SourceFormatError(path, f"line {line}: field '{key}' is {v}", "nanoseconds of DEVICE_TIME, "
                                            "0 to 2^63-1")
            if row["confidence"] not in (None, "") and not 0.0 <= conf <= 1.0:  # NaN fails too
                raise SourceFormatError(path, f"line {line}: field 'confidence' is {row['confidence']!r}",
                                        "a number in [0, 1], or empty")
            if b < a:
                raise SourceFormatError(path, f"line {line}: endTime_ns {b} < startTime_ns {a}", "end >= start")
            words.append(SpeechWord(a, b, row["written"] or "", conf))
    return words


def group_sentences(words: Iterable[SpeechWord], pause_sec: float = 0.6) -> list[list[SpeechWord]]:
    """Words (sorted by start) grouped into sentences: a sentence ends after a word ending in ``. ? ! …``
    (closing quotes/brackets allowed) or before a pause longer than ``pause_sec``."""
    out: list[list[SpeechWord]] = []
    cur: list[SpeechWord] = []
    pause = round(pause_sec * NS)
    for w in sorted(words, key=lambda w: (w.t_start_ns, w.t_end_ns)):
        if cur and (w.t_start_ns - cur[-1].t_end_ns > pause or SENTENCE_END.search(cur[-1].written.strip())):
            out.append(cur)
            cur = []
        cur.append(w)
    if cur:
        out.append(cur)
    return out


def speech_events(path: str, recording_id: str, *, min_confidence: float = 0.0,
                  pause_sec: float = 0.6) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``narrations`` event rows (one per sentence) and the speech report of one recording.

    Words with ``confidence < min_confidence`` (or no confidence when a threshold is set) are dropped
    first and counted; the rest are grouped by ``group_sentences``. ``text`` is the sentence with
    whitespace normalised, ``text_raw`` the words as written, joined by spaces. Extra columns:
    ``confidence`` (mean over the sentence's words) and ``n_words``.
    """
    words = read_speech_csv(path)
    kept = [w for w in words if min_confidence <= 0 or (w.confidence == w.confidence and w.confidence >= min_confidence)]
    sentences = group_sentences(kept, pause_sec)
    rows = []
    for i, s in enumerate(sentences):
        raw = " ".join(w.written for w in s)
        rows.append(event_row(recording_id, s[0].t_start_ns, max(w.t_end_ns for w in s), " ".join(raw.split()),
                              text_raw=raw, kind="narration", source="speech.csv", uid=f"{recording_id}:speech:{i}",
                              confidence=float(np.mean([w.confidence for w in s])), n_words=len(s)))
    report = {"file": path, "words": len(words), "dropped_low_confidence": len(words) - len(kept),
              "min_confidence": min_confidence, "sentence_pause_sec": pause_sec, "sentences": len(rows),
              "clock": "DEVICE_TIME"}
    if rows:
        report["t_start_ns"] = min(r["t_start_ns"] for r in rows)
        report["t_end_ns"] = max(r["t_end_ns"] for r in rows)
    return rows, report


# -- the adapter ---------------------------------------------------------------------------------------
def _check_options(imu: str, rgb: bool | None, rgb_size: Any, rotate: int, gop_sec: float, errors: str) -> None:
    if imu not in ("right", "left", "both"):
        raise ValueError(f"imu must be 'right', 'left' or 'both', got {imu!r}")
    if rgb not in (None, True, False):
        raise ValueError(f"rgb must be None (if present), True (required) or False (skip), got {rgb!r}")
    if rgb_size is not None:
        if len(rgb_size) != 2 or any(int(v) != v or v <= 0 or v % 2 for v in rgb_size):
            raise ValueError(f"rgb_size must be (height, width) with even positive integers, or None, got {rgb_size!r}")
    _rotation_k(rotate)
    if not 0 < gop_sec <= 1.0:
        raise ValueError(f"gop_sec must be in (0, 1], got {gop_sec}")
    check_errors(errors)


class AriaAdapter:
    """Prepares Project Aria recordings (AEA layout, VRS + sidecars) into a store. See the module docstring."""

    name = "aria"

    def fingerprint(self, root: str) -> str:
        def line(rid: str, path: str) -> str:
            st = os.stat(path)
            return f"{rid}|{os.path.basename(path)}|{st.st_size}|{st.st_mtime_ns}"

        return source_digest(f"aria-recipe-{RECIPE_VERSION}", (
            line(rec.recording_id, p) for rec in AriaLayout(root).recordings for p in rec.source_files()))

    def prepare(
        self,
        root: str,
        dst: str,
        *,
        overwrite: bool = False,
        progress: bool = True,
        errors: str = "raise",
        imu: str = "right",
        rectify: bool = False,
        rgb: bool | None = None,
        rgb_size: tuple[int, int] | None = (704, 704),
        rotate: int = -90,
        crf: int = 23,
        preset: str = "ultrafast",
        gop_sec: float = 0.5,
        min_confidence: float = 0.0,
        sentence_pause_sec: float = 0.6,
        imu_gap_factor: float = 5.0,
        storage_options: dict[str, Any] | None = None,
        copy_media: bool = True,
    ) -> str:
        """Write the store at ``dst``; returns its URL.

        ``imu``: which IMU is also written as the stream ``imu`` — ``"right"`` (default; ``imu-right``,
        ~1000 Hz), ``"left"`` (``imu-left``, ~800 Hz) or ``"both"`` (``imu`` = right, and both labels are
        required). The chosen label(s) must exist (SourceFormatError otherwise); the other IMU is written
        when present and reported absent when not. ``rectify``: apply the factory IMU calibration.
        ``rgb``: None = transcode ``camera-rgb`` when present (absence reported), True = required, False =
        skip video. ``rgb_size=(H, W)`` after ``rotate`` degrees (counter-clockwise positive; None = native).
        ``crf``/``preset``/``gop_sec``: H.264 settings. ``min_confidence``: drop speech words below it.
        ``errors="skip"`` leaves a bad recording out (reported) instead of aborting; nothing half-written is
        ever left at ``dst``. ``storage_options`` configure the filesystem of ``dst`` (e.g. an S3 endpoint).
        The transcoded mp4s always live inside the store (``media/``, referenced relative to its root: the
        store can be moved, copied or uploaded), so ``copy_media`` can only be True (it exists so that
        ``mmloader prepare --copy-media`` works for every built-in dataset).
        """
        if not copy_media:
            raise ValueError("copy_media=False: Aria stores always hold their (transcoded) media in media/")
        _check_options(imu, rgb, rgb_size, rotate, gop_sec, errors)
        _aria()  # fail early and clearly without projectaria-tools
        layout = AriaLayout(root)
        options = {"errors": errors, "imu": imu, "rectify": rectify, "rgb": rgb,
                   "rgb_size": list(rgb_size) if rgb_size else None, "rotate": rotate, "crf": crf, "preset": preset,
                   "gop_sec": gop_sec, "min_confidence": min_confidence, "sentence_pause_sec": sentence_pause_sec,
                   "imu_gap_factor": imu_gap_factor}
        t_start = time.perf_counter()
        run = Prepare(dataset="aria", root=root, dst=dst, fingerprint=self.fingerprint(root), options=options,
                      errors=errors, overwrite=overwrite, progress=progress, storage_options=storage_options,
                      report={"dataset": "aria", "source": layout.root, "clock": "DEVICE_TIME", "options": options,
                              "skipped": dict(layout.skipped)},
                      event_names=("narrations",))
        build = functools.partial(_recording, progress=progress, **{k: v for k, v in options.items() if k != "errors"})
        return run.run([(files.recording_id, files) for files in layout.recordings], build,
                       totals=lambda report: _totals(report, time.perf_counter() - t_start),
                       nothing_prepared=lambda report: SourceFormatError(
                           layout.root, f"no recording could be prepared (failed: {report['failed']})",
                           "at least one readable VRS recording"))


# -- one recording -----------------------------------------------------------------------------------
def _recording(writer: StoreWriter, files: AriaRecordingFiles, *, progress: bool, imu: str, rectify: bool,
               rgb: bool | None, rgb_size: list[int] | None, rotate: int, crf: int, preset: str, gop_sec: float,
               min_confidence: float, sentence_pause_sec: float, imu_gap_factor: float) -> RecordingRows:
    """The streams of one recording folder: its IMUs, its RGB video (transcoded) and its speech."""
    rid = check_id(files)
    provider = open_vrs(files.vrs)
    labels = stream_labels(provider)
    rec = RecordingRows(rid, report={"vrs": files.vrs, "labels_found": labels, "absent": [], "warnings": []})
    required = {"right": ["imu-right"], "left": ["imu-left"], "both": ["imu-right", "imu-left"]}[imu]
    if rgb is True:
        required.append(RGB_LABEL)
    missing = [lab for lab in required if lab not in labels]
    if missing:
        raise SourceFormatError(files.vrs, f"no stream labelled {missing} (labels found: {labels})",
                                f"the label(s) asked for by imu={imu!r}" + (", rgb=True" if rgb else ""))
    _imus(writer, rec, provider, files.vrs, imu=imu, rectify=rectify, gap_factor=imu_gap_factor)
    if rgb is False:
        rec.report["video"] = {"skipped": "rgb=False"}
    elif RGB_LABEL not in labels:
        rec.report["absent"].append(RGB_LABEL)
    else:
        _video(writer, provider, rec, progress=progress, rgb_size=rgb_size, rotate=rotate, crf=crf, preset=preset,
               gop_sec=gop_sec)
    _speech(rec, files, min_confidence=min_confidence, pause_sec=sentence_pause_sec)
    meta = {"vrs": files.vrs, "clock": "DEVICE_TIME", "labels": labels, **_vrs_metadata(provider)}
    if files.metadata is not None:
        try:
            with open(files.metadata, encoding="utf-8") as f:
                meta["metadata_json"] = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SourceFormatError(files.metadata, f"invalid JSON ({e})", "a JSON object") from None
    else:
        rec.report["warnings"].append("no metadata.json")
    if files.mps is not None:
        rec.report["mps"] = {"folders": sorted(d for d in os.listdir(files.mps) if not d.startswith(".")),
                             "note": "MPS outputs are not read by this recipe version"}
    spans = [s for s in rec.streams if s["kind"] != "events"]
    start, end = min(s["t_start_ns"] for s in spans), max(s["t_end_ns"] for s in spans)
    rec.report["t_start_ns"], rec.report["t_end_ns"] = start, end
    rec.set_recording("aria", None, int(end - start), sorted({s["stream"] for s in rec.streams}),
                      meta_json(meta, default=str))
    return rec


def _imus(writer: StoreWriter, rec: RecordingRows, provider: Any, vrs: str, *, imu: str, rectify: bool,
          gap_factor: float) -> None:
    """``imu_right`` and ``imu_left`` where present, and the stream ``imu``: an alias row (same Zarr group,
    same gaps) of the one ``imu`` names."""
    written: dict[str, dict[str, Any]] = {}
    for name, label in IMU_LABELS.items():
        series = read_imu(provider, label, rectify=rectify, gap_factor=gap_factor, where=vrs)
        if series is None:
            rec.report["absent"].append(label)
            continue
        rec.report[name] = series.report
        if series.t_ns.size < 2:
            rec.report["warnings"].append(f"{label}: {series.t_ns.size} valid samples: no {name} stream")
            continue
        written[name] = rec.write_timeseries(writer, name, series.t_ns, series.data, CHANNELS, UNITS,
                                             series.rate_hz, series.gaps)
    alias = "imu_left" if imu == "left" else "imu_right"
    if alias not in written:
        raise SourceFormatError(vrs, f"'{IMU_LABELS[alias]}' has fewer than 2 valid samples",
                                f"an IMU stream for imu={imu!r}")
    rec.streams.append({**written[alias], "stream": "imu"})  # the same Zarr group under the name 'imu'
    rec.add_gaps("imu", [(g["t_start_ns"], g["t_end_ns"]) for g in rec.gaps if g["stream"] == alias])
    rec.report["imu"] = {"alias_of": alias, "label": IMU_LABELS[alias]}


def _speech(rec: RecordingRows, files: AriaRecordingFiles, *, min_confidence: float, pause_sec: float) -> None:
    """The ``narrations`` of speech.csv (none without the file), and how many fall inside the sensor span."""
    if files.speech is None:
        rec.report["speech"] = {"file": None, "note": "no speech.csv: recording without narrations"}
        return
    narrations, speech = speech_events(files.speech, rec.recording_id, min_confidence=min_confidence,
                                       pause_sec=pause_sec)
    rec.report["speech"] = speech
    if rec.add_events("narrations", narrations) is not None:
        sensors = [s for s in rec.streams if s["kind"] != "events"]
        data_end = max((s["t_end_ns"] for s in sensors), default=None)
        data_start = min((s["t_start_ns"] for s in sensors), default=None)
        speech["sentences_inside_sensor_span"] = sum(1 for r in narrations if data_start is not None
                                                     and r["t_end_ns"] >= data_start and r["t_start_ns"] <= data_end)


def _video(writer: StoreWriter, provider: Any, rec: RecordingRows, *, progress: bool, rgb_size: list[int] | None,
           rotate: int, crf: int, preset: str, gop_sec: float) -> None:
    """Transcode camera-rgb into the store's work folder and index its pts; the stream row points where the
    file will be after the store is published."""
    rid, rep = rec.recording_id, rec.report
    rel = f"media/{rid}/{RGB_LABEL}.mp4"
    work_file = join(writer.work_path, rel)
    encode = functools.partial(transcode_rgb, provider, RGB_LABEL, rotate=rotate,
                               size=tuple(rgb_size) if rgb_size else None, crf=crf, preset=preset, gop_sec=gop_sec,
                               progress=progress, desc=f"{rid} {RGB_LABEL}")
    vrep = encode_into_store(writer, rel, encode)
    assert vrep is not None
    capture = vrep.pop("capture_ns")
    rep["video"] = vrep
    if capture.size == 0:
        rep["warnings"].append(f"{RGB_LABEL}: no decodable frame: no video stream")
        if writer.fs.exists(work_file):
            writer.fs.rm(work_file)
        return
    opts = dict(writer.storage_options or {})
    ident = media_identity(join(writer.work_url, rel), opts)  # after the rename on publish: same size, mtime
    info = probe_video(join(writer.work_url, rel), opts)  # work_path is fs-relative; probe by URL
    if info.num_frames != capture.size:
        raise SourceFormatError(work_file, f"transcoded file has {info.num_frames} frames, "
                                f"{capture.size} were written", "one mp4 frame per RGB frame")
    vrep["pts_rounding_max_ns"] = int(np.abs(info.pts_ns - capture).max())
    vrep["bytes"] = int(writer.fs.size(work_file))
    vrep["keyframes"] = int(info.keyframe.sum())
    fps = vrep.get("measured_fps") or vrep.get("nominal_fps") or info.fps
    rec.write_video(writer, "video", rel, info, rate_hz=float(fps), identity=ident)


def _vrs_metadata(provider: Any) -> dict[str, Any]:
    """Device serial, recording profile, start time (epoch s) and device version, where the file has them."""
    out: dict[str, Any] = {}
    try:
        md = provider.get_metadata()
        for key in ("device_serial", "recording_profile", "start_time_epoch_sec", "shared_session_id"):
            v = getattr(md, key, None)
            if v not in (None, ""):
                out[key] = v
        ts = getattr(md, "time_sync_mode", None)
        if ts is not None:
            out["time_sync_mode"] = str(ts)
    except Exception:  # metadata is informative only
        pass
    try:
        out["device_version"] = str(provider.get_device_version())
    except Exception:
        pass
    return out


def _totals(report: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The report's totals: counts, IMU samples per stream, rows fixed/dropped, frames, sentences, time taken."""
    recs = report["recordings"].values()
    return {
        **count_totals(report),
        "imu_samples": {n: sum(r.get(n, {}).get("samples", 0) for r in recs) for n in IMU_LABELS},
        "imu_rows_fixed": sum(sum(r.get(n, {}).get("fixed", {}).values()) for r in recs for n in IMU_LABELS),
        "imu_rows_dropped": sum(sum(r.get(n, {}).get("dropped", {}).values()) for r in recs for n in IMU_LABELS),
        "rgb_frames": sum((r.get("video") or {}).get("frames", 0) for r in recs),
        "speech_sentences": sum((r.get("speech") or {}).get("sentences", 0) for r in recs),
        "speech_words_dropped": sum((r.get("speech") or {}).get("dropped_low_confidence", 0) for r in recs),
        "prepare_sec": round(seconds, 3),
    }
