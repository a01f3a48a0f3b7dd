"""A deterministic, synthetic but byte-format-faithful Ego4D sample tree.

``generate_ego4d_sample(out_dir)`` writes::

    ROOT/
      v2/ego4d.json
      v2/full_scale/<video_uid>.mp4                   H.264 (libx264, yuv420p), constant frame rate
      v2/imu/<video_uid>.csv                          ~200 Hz IMU (absent for the one has_imu=false video)
      v2/annotations/narration.json                   narration_pass_1 / narration_pass_2
      v2/annotations/sample_activity_segments.json    sample-only ground truth (not part of real Ego4D)
      sample_manifest.json                            sample-only: splits, defects, gaps, segments

Clocks: every time in the tree is *canonical video time* (seconds from the first frame; the IMU CSV
writes it as ``canonical_timestamp_ms``). ``component_timestamp_ms`` is a per-component device clock:
canonical ms + an integer offset that changes when the stream restarts as a new component.

Content is learnable: every video is a sequence of activity segments (``ACTIVITIES``); each activity has
its own head-motion model (drives the IMU) and its own scene style (drives the frames, viewed through a
window that follows the integrated head yaw/pitch). See ``docs/sample-data.md``.

IMU frame (head-fixed, camera style): x = right, y = down, z = forward. ``accl_*`` in m/s^2 is the
linear acceleration plus the gravity vector (so a still, level head reads about (0, +9.81, 0));
``gyro_*`` in rad/s is the body angular velocity of the yaw (about down) / pitch (about right, + up) /
roll (about forward) Euler sequence whose angles are the integrals of those rates.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import uuid
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

__all__ = [
    "ACTIVITIES",
    "DEFECT_KINDS",
    "IMU_HEADER",
    "generate_ego4d_sample",
    "load_sample_manifest",
    "sample_defects",
]

ACTIVITIES: tuple[str, ...] = (
    "walking",
    "running",
    "sitting down",
    "standing up",
    "looking around",
    "cycling",
    "climbing stairs",
)
IMU_HEADER = (
    "component_idx,component_timestamp_ms,canonical_timestamp_ms,gyro_x,gyro_y,gyro_z,accl_x,accl_y,accl_z"
)
DEFECT_KINDS: tuple[str, ...] = (
    "missing_timestamps",  # canonical_timestamp_ms empty or the literal NULL
    "missing_accl",  # accl_x/y/z all empty, or one of them empty
    "non_monotonic",  # adjacent blocks of rows swapped
    "duplicate_timestamps",  # exact duplicate rows + rows sharing a timestamp with other values
    "time_outliers",  # canonical_timestamp_ms of +-1e12-ish
    "multi_component_gap",  # 1-3 s without samples, then component_idx + 1 with a fresh clock offset
)
MANIFEST_NAME = "sample_manifest.json"
MANIFEST_VERSION = 1

GRAVITY = 9.81  # m/s^2
IMU_RATE_HZ = 200.0  # nominal
_GRID_HZ = 400.0  # internal simulation grid
_SHORT_RAMP_SEC = 0.6  # blend between activities (motion, orientation)
_LONG_RAMP_SEC = 1.2  # blend of the posture height (seated / standing)
_HEADING_SD_RAD = 0.1  # per-segment offset of the heading from the place's direction
_GAZE_PITCH_RAD = 0.3  # amplitude of the slow look-up / look-down on top of every activity's pitch
_GAZE_HZ = (0.015, 0.05)  # its frequencies
_SEGMENT_SEC = (8.0, 20.0)
_MIN_LAST_SEGMENT_SEC = 4.0
_FOV_RAD = math.pi / 2  # horizontal field of view of the rendered window
_PANO_ROWS = 3  # panorama height in frame heights (the pitch range the frames can follow)
_BOB_PX_PER_M = 60.0  # vertical bob in the image (exaggerated: a distant scene would barely move)
_HEIGHT_PX_PER_M = 60.0  # posture height in the image
_TAU = 2.0 * math.pi

_SCENARIOS = {
    "walking": "Indoor Navigation (walking)",
    "running": "Cycling / jogging",
    "sitting down": "Working at desk",
    "standing up": "Household management",
    "looking around": "Hanging out with friends",
    "cycling": "Cycling / jogging",
    "climbing stairs": "Indoor Navigation (walking)",
}


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------


def generate_ego4d_sample(
    out_dir: str | os.PathLike,
    videos: int = 8,
    seconds: float = 60.0,
    seed: int = 0,
    defect_fraction: float = 0.3,
    fps: float = 30.0,
    size: tuple[int, int] = (160, 120),
    progress: bool = True,
) -> pathlib.Path:
    """Write a synthetic Ego4D tree under ``out_dir`` and return that root.

    ``seconds`` is each video's length (s), ``fps`` its constant frame rate, ``size`` its (width, height)
    in pixels. ``defect_fraction`` of the IMU CSVs carry every kind of ``DEFECT_KINDS`` (at least one
    when > 0 and ``videos >= 3``). Same arguments → byte-identical CSV/JSON files and identical decoded
    frames. Raises ValueError on bad arguments and FileExistsError when ``out_dir`` is not empty.
    """
    _validate_args(videos, seconds, seed, defect_fraction, fps, size)
    root = pathlib.Path(out_dir)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not an empty directory; choose a new output directory")
    rate = Fraction(str(float(fps))).limit_denominator(100_000)
    num_frames = int(round(seconds * float(rate)))
    duration = num_frames / float(rate)
    width, height = int(size[0]), int(size[1])

    seq = np.random.SeedSequence(seed)
    plan_seq, scene_seq, *video_seqs = seq.spawn(2 + videos)
    plans = _plan_dataset(np.random.default_rng(plan_seq), videos, duration, defect_fraction)
    # One place per activity, shared by every video of the dataset (as recurring scenario locations).
    panoramas = {a: _panorama(a, np.random.default_rng(s), (width, height))
                 for a, s in zip(ACTIVITIES, scene_seq.spawn(len(ACTIVITIES)))}

    v2 = root / "v2"
    for sub in ("full_scale", "imu", "annotations"):
        (v2 / sub).mkdir(parents=True, exist_ok=True)

    narrations: dict[str, Any] = {}
    manifest_videos: list[dict[str, Any]] = []
    for plan, vseq in tqdm(list(zip(plans, video_seqs)), desc="ego4d sample", unit="video", disable=not progress):
        motion_seq, imu_seq, frame_seq, text_seq, defect_seq = vseq.spawn(5)
        head = _simulate_head(plan.segments, duration, np.random.default_rng(motion_seq))
        frames = _render_frames(head, plan.segments, num_frames, float(rate), (width, height), panoramas,
                                np.random.default_rng(frame_seq))
        _encode_mp4(v2 / "full_scale" / f"{plan.video_uid}.mp4", frames, rate, (width, height))
        imu_info: dict[str, Any] = {}
        if plan.has_imu:
            imu_info = _write_imu_csv(v2 / "imu" / f"{plan.video_uid}.csv", head, duration, plan.defective,
                                      np.random.default_rng(imu_seq), np.random.default_rng(defect_seq))
        if plan.narration_passes:
            narrations[plan.video_uid] = _narration_entry(plan, float(rate), duration, np.random.default_rng(text_seq))
        manifest_videos.append(_manifest_entry(plan, imu_info))

    _write_json(v2 / "ego4d.json", _metadata_doc(plans, duration, num_frames, float(rate), (width, height)))
    _write_json(v2 / "annotations" / "narration.json", narrations)
    _write_json(v2 / "annotations" / "sample_activity_segments.json",
                {p.video_uid: [s.as_dict() for s in p.segments] for p in plans})
    _write_json(root / MANIFEST_NAME, _manifest_doc(manifest_videos, {
        "videos": int(videos), "seconds": float(seconds), "seed": int(seed), "defect_fraction": float(defect_fraction),
        "fps": float(fps), "size": [width, height]}))
    return root


def load_sample_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """The ``sample_manifest.json`` written by ``generate_ego4d_sample`` under ``root``."""
    with open(pathlib.Path(root) / MANIFEST_NAME, encoding="utf-8") as f:
        return json.load(f)


def sample_defects(root: str | os.PathLike) -> dict[str, list[str]]:
    """``{video_uid: [defect kind, ...]}`` for every video of the sample (empty list = clean or no IMU)."""
    return {v["video_uid"]: list(v["defects"]) for v in load_sample_manifest(root)["videos"]}


# --------------------------------------------------------------------------------------------------
# arguments and dataset plan
# --------------------------------------------------------------------------------------------------


def _validate_args(videos: Any, seconds: Any, seed: Any, defect_fraction: Any, fps: Any, size: Any) -> None:
    """Raise ValueError naming the first bad argument."""

    def is_int(x: Any) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    def is_real(x: Any) -> bool:
        return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)

    if not is_int(videos) or not 2 <= videos <= 10_000:
        raise ValueError(f"videos must be an integer in [2, 10000], got {videos!r}")
    if not is_real(seconds) or not 10.0 <= seconds <= 3600.0:
        raise ValueError(f"seconds must be a number in [10, 3600], got {seconds!r}")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not is_real(defect_fraction) or not 0.0 <= defect_fraction <= 1.0:
        raise ValueError(f"defect_fraction must be a number in [0, 1], got {defect_fraction!r}")
    if not is_real(fps) or not 1.0 <= fps <= 120.0:
        raise ValueError(f"fps must be a number in [1, 120], got {fps!r}")
    if (not isinstance(size, (tuple, list)) or len(size) != 2 or not all(is_int(s) for s in size)
            or not all(32 <= s <= 4096 and s % 2 == 0 for s in size)):
        raise ValueError(f"size must be (width, height), even integers in [32, 4096], got {size!r}")


@dataclass(frozen=True)
class _Segment:
    """One activity over [start_sec, end_sec) of canonical video time."""

    start_sec: float
    end_sec: float
    activity: str

    def as_dict(self) -> dict[str, Any]:
        return {"start_sec": self.start_sec, "end_sec": self.end_sec, "activity": self.activity}


@dataclass(frozen=True)
class _VideoPlan:
    """Everything decided at dataset level for one video."""

    video_uid: str
    split: str
    has_imu: bool
    defective: bool
    narration_passes: tuple[str, ...]  # () = absent from narration.json
    segments: tuple[_Segment, ...]
    device: str
    physical_setting: str


def _uuid4(rng: np.random.Generator) -> str:
    """A uuid4-formatted string drawn from ``rng`` (never from the OS)."""
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _plan_dataset(rng: np.random.Generator, videos: int, duration: float, defect_fraction: float) -> list[_VideoPlan]:
    """Uids, splits, which video lacks IMU, which CSVs are defective, narration passes, segments."""
    uids = [_uuid4(rng) for _ in range(videos)]
    splits = _assign_splits(rng, videos)
    no_imu = 1 + int(rng.integers(videos - 1))
    imu_videos = [i for i in range(videos) if i != no_imu]
    n_defective = _defect_count(defect_fraction, videos, len(imu_videos))
    defective = {int(i) for i in rng.choice(imu_videos, size=n_defective, replace=False)} if n_defective else set()
    passes = _assign_narration_passes(rng, videos, no_imu)
    segments = _plan_segments(rng, videos, duration)
    settings = [f"synthetic_site_{int(rng.integers(1, 6))}" for _ in range(videos)]
    return [
        _VideoPlan(video_uid=uids[i], split=splits[i], has_imu=i != no_imu, defective=i in defective,
                   narration_passes=passes[i], segments=segments[i],
                   device="Vuzix Blade" if i != no_imu else "GoPro Hero 8", physical_setting=settings[i])
        for i in range(videos)
    ]


def _assign_splits(rng: np.random.Generator, videos: int) -> list[str]:
    """≈ 60/20/20 % train/val/test, at least one train and one val video."""
    n_val = max(1, round(0.2 * videos))
    n_test = max(0, min(round(0.2 * videos), videos - n_val - 1))
    labels = ["train"] * (videos - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
    return [labels[i] for i in rng.permutation(videos)]


def _defect_count(defect_fraction: float, videos: int, imu_videos: int) -> int:
    """How many IMU CSVs are defective."""
    n = int(round(defect_fraction * imu_videos))
    if defect_fraction > 0 and videos >= 3:
        n = max(n, 1)
    return min(n, imu_videos)


def _assign_narration_passes(rng: np.random.Generator, videos: int, no_imu: int) -> list[tuple[str, ...]]:
    """One video (not the no-IMU one) is absent from narration.json; of the others, one has only pass 1
    (when >= 2 remain), one only pass 2 (when >= 3 remain), the rest both passes."""
    both = ("narration_pass_1", "narration_pass_2")
    out: list[tuple[str, ...]] = [both] * videos
    others = [i for i in range(videos) if i != no_imu]
    absent = int(rng.choice(others))
    out[absent] = ()
    rest = [int(i) for i in rng.permutation([i for i in range(videos) if i != absent])]
    if len(rest) >= 2:
        out[rest[0]] = ("narration_pass_1",)
    if len(rest) >= 3:
        out[rest[1]] = ("narration_pass_2",)
    return out


def _plan_segments(rng: np.random.Generator, videos: int, duration: float) -> list[tuple[_Segment, ...]]:
    """Contiguous segments of 8-20 s per video (30-60 % of the video when it is shorter than 24 s; a
    too-short remainder joins the last segment). Activities come from a deck of shuffled permutations of
    ``ACTIVITIES``, so every activity appears once the dataset has ``len(ACTIVITIES)`` segments; never
    the same activity twice in a row within a video."""
    deck: deque[str] = deque()

    def draw(previous: str | None) -> str:
        while len(deck) < 2:
            deck.extend(ACTIVITIES[i] for i in rng.permutation(len(ACTIVITIES)))
        if deck[0] == previous:
            deck[0], deck[1] = deck[1], deck[0]
        return deck.popleft()

    lo, hi = _SEGMENT_SEC
    if duration < 3 * lo:  # short videos still change activity
        lo, hi = 0.3 * duration, 0.6 * duration
    min_last = min(_MIN_LAST_SEGMENT_SEC, lo)
    out = []
    for _ in range(videos):
        segs: list[_Segment] = []
        t = 0.0
        while duration - t > 1e-9:
            end = round(t + float(rng.uniform(lo, hi)), 3)
            if duration - end < min_last:
                end = duration
            segs.append(_Segment(round(t, 3), end, draw(segs[-1].activity if segs else None)))
            t = end
        out.append(tuple(segs))
    return out


# --------------------------------------------------------------------------------------------------
# head motion (drives the IMU and the camera window)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Motion:
    """One activity's head motion on the grid. Heading frame: x right, y down, z forward.

    Displacements in m (``bob``: fast vertical motion, ``height``: posture level, 0 standing, ~0.45
    seated, both + down); ``pitch``/``roll`` in rad (pitch + up); ``yaw_rate`` in rad/s (+ = turn right).
    """

    lateral: np.ndarray
    bob: np.ndarray
    height: np.ndarray
    forward: np.ndarray
    pitch: np.ndarray
    roll: np.ndarray
    yaw_rate: np.ndarray


@dataclass(frozen=True)
class _HeadTrack:
    """The simulated head on a regular grid ``t`` (s, canonical). ``gyro``/``accl`` are noise-free
    body-frame readings (rad/s, m/s^2 incl. gravity); ``yaw``/``pitch`` are integrated from the rates."""

    t: np.ndarray
    yaw: np.ndarray
    pitch: np.ndarray
    bob: np.ndarray
    height: np.ndarray
    gyro: np.ndarray  # (N, 3)
    accl: np.ndarray  # (N, 3)


def _sin(tau: np.ndarray, freq: float, phase: float) -> np.ndarray:
    return np.sin(_TAU * freq * tau + phase)


def _disp(accel_amplitude: float, freq: float) -> float:
    """Displacement amplitude (m) of a sinusoid whose acceleration amplitude is ``accel_amplitude``."""
    return accel_amplitude / (_TAU * freq) ** 2


def _min_jerk(x: np.ndarray) -> np.ndarray:
    """Minimum-jerk profile 0 → 1 over x in [0, 1], clamped outside."""
    x = np.clip(x, 0.0, 1.0)
    return x**3 * (10 - 15 * x + 6 * x**2)


def _gait(tau: np.ndarray, rng: np.random.Generator, step_hz: tuple[float, float], bounce: tuple[float, float],
          sway: tuple[float, float], surge: tuple[float, float]) -> tuple[np.ndarray, ...]:
    """Step-driven translation: vertical bounce at the step rate (+ 2nd harmonic), lateral sway at half
    of it, fore-aft surge. Amplitudes are acceleration amplitudes (m/s^2). Returns
    (step_hz, phase, lateral, bob, forward)."""
    f = float(rng.uniform(*step_hz))
    ph = float(rng.uniform(0, _TAU))
    b, s, g = (float(rng.uniform(*r)) for r in (bounce, sway, surge))
    bob = -_disp(b, f) * _sin(tau, f, ph) - _disp(0.3 * b, 2 * f) * _sin(tau, 2 * f, 2 * ph + 0.5)
    lateral = -_disp(s, f / 2) * _sin(tau, f / 2, ph)
    forward = -_disp(g, f) * _sin(tau, f, ph + math.pi / 2)
    return f, ph, lateral, bob, forward


def _wander(tau: np.ndarray, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Slow heading changes: a yaw rate (rad/s) at 0.05-0.15 Hz."""
    return amplitude * _sin(tau, float(rng.uniform(0.05, 0.15)), float(rng.uniform(0, _TAU)))


def _walking(tau: np.ndarray, rng: np.random.Generator) -> _Motion:
    """≈1.8 Hz steps, ±2 m/s^2 bounce, sway at half the step rate, small yaw."""
    f, ph, lateral, bob, forward = _gait(tau, rng, (1.6, 2.0), (1.6, 2.4), (0.5, 0.9), (0.5, 0.9))
    pitch = -0.12 + 0.03 * _sin(tau, f, ph) + 0.05 * _sin(tau, 0.1, float(rng.uniform(0, _TAU)))
    roll = 0.04 * _sin(tau, f / 2, ph)
    yaw_rate = 0.12 * _sin(tau, f / 2, ph + 0.3) + _wander(tau, rng, 0.2)
    return _Motion(lateral, bob, np.zeros_like(tau), forward, pitch, roll, yaw_rate)


def _running(tau: np.ndarray, rng: np.random.Generator) -> _Motion:
    """≈2.8 Hz steps, ±6-8 m/s^2 bounce, strong sway and head nodding."""
    f, ph, lateral, bob, forward = _gait(tau, rng, (2.6, 3.0), (6.0, 8.0), (1.5, 2.5), (1.5, 2.5))
    pitch = -0.08 + 0.05 * _sin(tau, f, ph + 0.4)
    roll = 0.07 * _sin(tau, f / 2, ph)
    yaw_rate = 0.2 * _sin(tau, f / 2, ph + 0.3) + _wander(tau, rng, 0.1)
    return _Motion(lateral, bob, np.zeros_like(tau), forward, pitch, roll, yaw_rate)


def _climbing_stairs(tau: np.ndarray, rng: np.random.Generator) -> _Motion:
    """≈1.4 Hz steps with an asymmetric ±3 m/s^2 bounce, head pitched down at the steps."""
    f, ph, lateral, bob, forward = _gait(tau, rng, (1.2, 1.6), (2.5, 3.5), (0.6, 1.0), (1.0, 1.6))
    pitch = -0.32 + 0.04 * _sin(tau, f, ph + 0.8)
    roll = 0.05 * _sin(tau, f / 2, ph)
    yaw_rate = 0.1 * _sin(tau, f / 2, ph) + _wander(tau, rng, 0.1)
    return _Motion(lateral, bob, np.zeros_like(tau), forward, pitch, roll, yaw_rate)


def _cycling(tau: np.ndarray, rng: np.random.Generator) -> _Motion:
    """≈1.2 Hz pedalling sway + 12-35 Hz road vibration, head pitched towards the road."""
    f = float(rng.uniform(1.0, 1.4))
    ph = float(rng.uniform(0, _TAU))
    sway = float(rng.uniform(0.6, 1.2))
    lateral = -_disp(sway, f) * _sin(tau, f, ph)
    forward = -_disp(0.4, 2 * f) * _sin(tau, 2 * f, 2 * ph)
    bob = -_disp(0.3, 0.5) * _sin(tau, 0.5, float(rng.uniform(0, _TAU)))
    pitch = -0.2 + 0.02 * _sin(tau, f, ph)
    envelope = 1.0 + 0.5 * _sin(tau, float(rng.uniform(0.2, 0.5)), float(rng.uniform(0, _TAU)))
    for _ in range(6):
        fv, pv = float(rng.uniform(12.0, 35.0)), float(rng.uniform(0, _TAU))
        bob = bob - envelope * _disp(float(rng.uniform(0.3, 0.6)), fv) * _sin(tau, fv, pv)
        pitch = pitch + 0.0008 * envelope * _sin(tau, fv, pv + 1.0)
    roll = 0.06 * _sin(tau, f, ph)
    yaw_rate = 0.05 * _sin(tau, 0.07, ph)
    return _Motion(lateral, bob, np.zeros_like(tau), forward, pitch, roll, yaw_rate)


def _posture_change(tau: np.ndarray, rng: np.random.Generator, *, sit: bool) -> _Motion:
    """Sitting down (head drops ~0.45 m, leans forward, ends pitched down and still) or standing up
    (head rises, leans forward, then light sway)."""
    t0, dur = float(rng.uniform(0.3, 1.2)), float(rng.uniform(1.4, 2.4))
    s = _min_jerk((tau - t0) / dur)
    lean = np.sin(math.pi * s)
    drop = float(rng.uniform(0.4, 0.5))
    p_seated, p_standing = float(rng.uniform(-0.45, -0.3)), -0.08
    ph = float(rng.uniform(0, _TAU))
    if sit:
        height = drop * s
        pitch = p_standing + (p_seated - p_standing) * s - 0.25 * lean + 0.015 * _sin(tau, 0.2, ph)
        lateral = np.zeros_like(tau)
        roll = 0.01 * _sin(tau, 0.13, ph)
        yaw_rate = 0.03 * _sin(tau, 0.17, ph)
    else:
        height = drop * (1.0 - s)
        pitch = p_seated + (p_standing - p_seated) * s - 0.3 * lean
        lateral = 0.02 * s * _sin(tau, 0.3, ph)
        roll = 0.02 * s * _sin(tau, 0.3, ph + 0.5)
        yaw_rate = 0.08 * s * _sin(tau, 0.15, ph)
    bob = 0.002 * _sin(tau, 0.25, ph)  # breathing
    forward = 0.15 * lean
    return _Motion(lateral, bob, height, forward, pitch, roll, yaw_rate)


def _sitting_down(tau: np.ndarray, rng: np.random.Generator) -> _Motion:
    return _posture_change(tau, rng, sit=True)


def _standing_up(tau: np.ndarray, rng: np.random.Generator) -> _Motion:
    return _posture_change(tau, rng, sit=False)


def _looking_around(tau: np.ndarray, rng: np.random.Generator) -> _Motion:
    """Slow, large yaw sweeps (±0.6-0.9 rad, peak ≈1-1.4 rad/s) and pitch nods; body nearly still."""
    a, f, ph = float(rng.uniform(0.6, 0.9)), float(rng.uniform(0.15, 0.22)), float(rng.uniform(0, _TAU))
    a2, f2, ph2 = float(rng.uniform(0.03, 0.1)), float(rng.uniform(0.3, 0.4)), float(rng.uniform(0, _TAU))
    yaw_rate = a * _TAU * f * np.cos(_TAU * f * tau + ph) + a2 * _TAU * f2 * np.cos(_TAU * f2 * tau + ph2)
    pitch = -0.05 + 0.25 * _sin(tau, float(rng.uniform(0.08, 0.15)), float(rng.uniform(0, _TAU)))
    roll = 0.03 * _sin(tau, 0.11, ph)
    lateral = 0.01 * _sin(tau, 0.2, ph2)
    zeros = np.zeros_like(tau)
    return _Motion(lateral, 0.002 * _sin(tau, 0.25, ph), zeros, zeros, pitch, roll, yaw_rate)


_MOTION_MODELS: dict[str, Callable[[np.ndarray, np.random.Generator], _Motion]] = {
    "walking": _walking,
    "running": _running,
    "sitting down": _sitting_down,
    "standing up": _standing_up,
    "looking around": _looking_around,
    "cycling": _cycling,
    "climbing stairs": _climbing_stairs,
}


def _gaze(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Slow looking up and down (rad, + up) that every activity shares: two sinusoids at ``_GAZE_HZ``,
    peak ≈ ±``_GAZE_PITCH_RAD``. It tilts gravity in the accelerometer and moves the horizon in the frames,
    so it is what lets a window's IMU tell *which* frame of an activity it belongs to."""
    out = np.zeros_like(t)
    for share in (0.6, 0.4):
        f, ph = float(rng.uniform(*_GAZE_HZ)), float(rng.uniform(0, _TAU))
        out += share * _GAZE_PITCH_RAD * _sin(t, f, ph)
    return out


def _blend_weights(segments: Sequence[_Segment], t: np.ndarray, ramp_sec: float) -> np.ndarray:
    """(S, N) partition of unity: segment indicators smoothed by a Hann window of ``ramp_sec``."""
    starts = np.array([s.start_sec for s in segments])
    idx = np.clip(np.searchsorted(starts, t, side="right") - 1, 0, len(segments) - 1)
    ind = (idx[None, :] == np.arange(len(segments))[:, None]).astype(np.float64)
    k = max(3, int(ramp_sec * _GRID_HZ) | 1)
    kernel = np.hanning(k + 2)[1:-1]
    kernel /= kernel.sum()
    half = k // 2
    padded = np.pad(ind, ((0, 0), (half, half)), mode="edge")
    return np.stack([np.convolve(row, kernel, mode="valid") for row in padded])


def _cumtrapz(y: np.ndarray, dt: float) -> np.ndarray:
    """Cumulative trapezoidal integral starting at 0."""
    out = np.zeros_like(y)
    out[1:] = np.cumsum(0.5 * (y[1:] + y[:-1])) * dt
    return out


def _rot_x_t(v: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """R_x(angle)^T v for (N, 3) vectors (rotation about the right axis)."""
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([v[:, 0], c * v[:, 1] + s * v[:, 2], -s * v[:, 1] + c * v[:, 2]], axis=1)


def _rot_z_t(v: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """R_z(angle)^T v for (N, 3) vectors (rotation about the forward axis)."""
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([c * v[:, 0] + s * v[:, 1], -s * v[:, 0] + c * v[:, 1], v[:, 2]], axis=1)


def _simulate_head(segments: Sequence[_Segment], duration: float, rng: np.random.Generator) -> _HeadTrack:
    """Blend the activity models over the video, integrate the orientation from the angular rates and
    derive the noise-free body-frame gyro and accelerometer readings."""
    dt = 1.0 / _GRID_HZ
    t = np.arange(int(math.ceil(duration * _GRID_HZ)) + 1) * dt
    parts = [_MOTION_MODELS[s.activity](t - s.start_sec, rng) for s in segments]
    w_short = _blend_weights(segments, t, _SHORT_RAMP_SEC)
    w_long = _blend_weights(segments, t, _LONG_RAMP_SEC)

    def mix(name: str, w: np.ndarray) -> np.ndarray:
        return np.sum([wi * np.broadcast_to(getattr(p, name), t.shape) for wi, p in zip(w, parts)], axis=0)

    lateral, bob, forward = mix("lateral", w_short), mix("bob", w_short), mix("forward", w_short)
    height = mix("height", w_long)
    pitch_target, roll_target = mix("pitch", w_short) + _gaze(t, rng), mix("roll", w_short)
    pitch_rate, roll_rate = np.gradient(pitch_target, dt), np.gradient(roll_target, dt)
    # Heading: during a segment the head turns about the direction of its place (azimuth 0 of the
    # activity's panorama, + a small per-segment offset), e.g. along the corridor; between segments it
    # turns to the next one within the blend.
    yaw_parts = []
    for seg, part in zip(segments, parts):
        turn = _cumtrapz(np.broadcast_to(part.yaw_rate, t.shape), dt)
        inside = (t >= seg.start_sec) & (t < seg.end_sec)
        yaw_parts.append(float(rng.normal(0.0, _HEADING_SD_RAD)) + turn - turn[inside].mean())
    yaw_target = np.sum([wi * y for wi, y in zip(w_short, yaw_parts)], axis=0)
    yaw_rate = np.gradient(yaw_target, dt)
    # Orientation = integral of the Euler rates (what the gyro below measures).
    pitch = float(pitch_target[0]) + _cumtrapz(pitch_rate, dt)
    roll = float(roll_target[0]) + _cumtrapz(roll_rate, dt)
    yaw = float(yaw_target[0]) + _cumtrapz(yaw_rate, dt)

    zeros = np.zeros_like(t)
    yaw_body = _rot_z_t(_rot_x_t(np.stack([zeros, yaw_rate, zeros], axis=1), pitch), roll)
    pitch_body = _rot_z_t(np.stack([pitch_rate, zeros, zeros], axis=1), roll)
    gyro = yaw_body + pitch_body + np.stack([zeros, zeros, roll_rate], axis=1)

    accel = np.stack([np.gradient(np.gradient(x, dt), dt) for x in (lateral, bob + height, forward)], axis=1)
    accel[:, 1] += GRAVITY
    accl = _rot_z_t(_rot_x_t(accel, pitch), roll)
    return _HeadTrack(t=t, yaw=yaw, pitch=pitch, bob=bob, height=height, gyro=gyro, accl=accl)


# --------------------------------------------------------------------------------------------------
# IMU CSV
# --------------------------------------------------------------------------------------------------


def _sample_times(duration: float, rng: np.random.Generator) -> np.ndarray:
    """IMU sample times (s, canonical): ~200 Hz with a slightly off clock rate and ±0.3 ms jitter,
    starting up to 0.5 s after the first frame and ending up to 0.5 s before the video end."""
    t0 = float(rng.uniform(0.02, 0.5))
    t1 = duration - float(rng.uniform(0.02, 0.5))
    period = 1.0 / (IMU_RATE_HZ * (1.0 + float(rng.uniform(-2e-4, 2e-4))))
    n = int((t1 - t0) / period) + 1
    return t0 + np.arange(n) * period + rng.uniform(-3e-4, 3e-4, n)


def _sensor_readings(head: _HeadTrack, t: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(gyro rad/s, accl m/s^2) at times ``t``: the head track + white noise; gyro also gets a bias
    that drifts as a random walk."""
    gyro = np.stack([np.interp(t, head.t, head.gyro[:, k]) for k in range(3)], axis=1)
    accl = np.stack([np.interp(t, head.t, head.accl[:, k]) for k in range(3)], axis=1)
    bias = rng.normal(0.0, 0.01, 3) + np.cumsum(rng.normal(0.0, 4e-5, (t.size, 3)), axis=0)
    gyro = gyro + bias + rng.normal(0.0, 0.01, gyro.shape)
    accl = accl + rng.normal(0.0, 0.04, accl.shape)
    return gyro, accl


def _plan_gaps(duration: float, t: np.ndarray, rng: np.random.Generator) -> list[tuple[float, float]]:
    """1 gap (2 when the video is >= 30 s) of 1-3 s without samples, returned as the planned
    (start, end) in seconds."""
    n = 1 if duration < 30.0 else 2
    span = t[-1] - t[0]
    out = []
    for k in range(n):
        centre = t[0] + span * (k + 1) / (n + 1) + float(rng.uniform(-0.05, 0.05)) * span
        length = float(rng.uniform(1.0, 3.0))
        out.append((centre - length / 2, centre + length / 2))
    return out


def _format_rows(t: np.ndarray, gyro: np.ndarray, accl: np.ndarray, component: np.ndarray,
                 offsets_ms: Sequence[int]) -> list[list[str]]:
    """CSV fields as strings: times to 3 decimals (ms), sensor values to 6 decimals."""
    canon = np.round(t * 1000.0, 3)
    comp_ts = canon + np.asarray(offsets_ms, dtype=np.float64)[component]
    cols = [
        [str(int(c)) for c in component],
        [f"{x:.3f}" for x in comp_ts],
        [f"{x:.3f}" for x in canon],
        *([f"{x:.6f}" for x in gyro[:, k]] for k in range(3)),
        *([f"{x:.6f}" for x in accl[:, k]] for k in range(3)),
    ]
    return [list(r) for r in zip(*cols)]


def _inject_row_defects(rows: list[list[str]], rng: np.random.Generator) -> dict[str, int]:
    """Damage rows in place (see ``DEFECT_KINDS``) and return how many rows got each encoding."""
    counts = {"empty_timestamp": 4, "null_timestamp": 4, "empty_accl_all": 4, "empty_accl_one": 3,
              "time_outlier": 3, "exact_duplicate": 4, "conflicting_duplicate": 3}
    chosen = rng.choice(np.arange(20, len(rows) - 20), size=sum(counts.values()), replace=False)
    picks: dict[str, list[int]] = {}
    at = 0
    for name, n in counts.items():
        picks[name] = sorted(int(i) for i in chosen[at:at + n])
        at += n
    for i in picks["empty_timestamp"]:
        rows[i][2] = ""
    for i in picks["null_timestamp"]:
        rows[i][2] = "NULL"
    for i in picks["empty_accl_all"]:
        rows[i][6:9] = ["", "", ""]
    for i in picks["empty_accl_one"]:
        rows[i][6 + int(rng.integers(3))] = ""
    for i in picks["time_outlier"]:
        rows[i][2] = f"{float(rng.choice([1.0e12, -1.0e12, 9.999e12, -5.0e11])) + float(rng.uniform(0, 1e3)):.3f}"
    inserts = [(i, list(rows[i])) for i in picks["exact_duplicate"]]
    for i in picks["conflicting_duplicate"]:
        other = list(rows[i])
        other[3:9] = [f"{float(v) + float(rng.normal(0, 0.5)):.6f}" for v in other[3:9]]
        inserts.append((i, other))
    for i, row in sorted(inserts, key=lambda x: x[0], reverse=True):
        rows.insert(i + 1, row)
    counts["swapped_blocks"] = _swap_blocks(rows, rng, 3)
    return counts


def _swap_blocks(rows: list[list[str]], rng: np.random.Generator, n_blocks: int) -> int:
    """Swap ``n_blocks`` pairs of adjacent blocks (4-12 rows each), one pair per region of the file."""
    region = len(rows) // n_blocks
    for k in range(n_blocks):
        size = int(rng.integers(4, 13))
        start = k * region + int(rng.integers(10, region - 2 * size - 10))
        a, b = rows[start:start + size], rows[start + size:start + 2 * size]
        rows[start:start + 2 * size] = b + a
    return n_blocks


def _write_imu_csv(path: pathlib.Path, head: _HeadTrack, duration: float, defective: bool,
                   rng: np.random.Generator, defect_rng: np.random.Generator) -> dict[str, Any]:
    """Sample, (maybe) damage and write one IMU CSV; return its manifest facts (times in s)."""
    t = _sample_times(duration, rng)
    gyro, accl = _sensor_readings(head, t, rng)
    component = np.zeros(t.size, dtype=np.int64)
    offsets = [int(rng.integers(1_600_000_000_000, 1_650_000_000_000))]
    gaps: list[list[float]] = []
    if defective:
        keep = np.ones(t.size, dtype=bool)
        for a, b in _plan_gaps(duration, t, defect_rng):
            inside = (t > a) & (t < b)
            keep &= ~inside
            component[t >= b] += 1
            offsets.append(int(defect_rng.integers(1_000_000, 9_000_000)))
        t, gyro, accl, component = t[keep], gyro[keep], accl[keep], component[keep]
        gaps = [[_csv_sec(t[j]), _csv_sec(t[j + 1])] for j in np.flatnonzero(np.diff(component))]
    rows = _format_rows(t, gyro, accl, component, offsets)
    defect_rows = _inject_row_defects(rows, defect_rng) if defective else {}
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(IMU_HEADER + "\n")
        f.writelines(",".join(r) + "\n" for r in rows)
    components = []
    for c in range(int(component.max()) + 1):
        tc = t[component == c]
        components.append({"component_idx": c, "offset_ms": offsets[c], "start_sec": _csv_sec(tc[0]),
                           "end_sec": _csv_sec(tc[-1]), "samples": int(tc.size)})
    return {"defects": list(DEFECT_KINDS) if defective else [], "defect_rows": defect_rows, "gaps_sec": gaps,
            "components": components, "imu_start_sec": _csv_sec(t[0]), "imu_end_sec": _csv_sec(t[-1]),
            "rows": len(rows)}


def _csv_sec(t: float) -> float:
    """A sample time (s) exactly as the CSV writes it (ms to 3 decimals), back in seconds."""
    return round(float(f"{np.round(float(t) * 1000.0, 3):.3f}") / 1000.0, 6)


# --------------------------------------------------------------------------------------------------
# scenes and video
# --------------------------------------------------------------------------------------------------


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """HSV in [0, 1] → RGB float in [0, 255]."""
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, r = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, r, p), (q, v, p), (p, v, r), (p, q, v), (r, p, v), (v, p, q)][i]
    return np.array(rgb) * 255.0


def _colour(rng: np.random.Generator, h: tuple[float, float], s: tuple[float, float],
            v: tuple[float, float]) -> np.ndarray:
    """A random colour inside an HSV box (hue wraps)."""
    return _hsv(float(rng.uniform(*h)) % 1.0, float(rng.uniform(*s)), float(rng.uniform(*v)))


@dataclass(frozen=True)
class _Canvas:
    """Panorama coordinates: ``u`` azimuth in [0, 1) (wraps), ``v`` elevation in [0, 1] (0 = top,
    0.5 = horizon), both (H, W); ``img`` float RGB."""

    u: np.ndarray
    v: np.ndarray
    img: np.ndarray

    @classmethod
    def new(cls, height: int, width: int, fill: np.ndarray) -> _Canvas:
        v, u = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")
        return cls(u=u, v=v, img=np.broadcast_to(fill, (height, width, 3)).astype(np.float64))

    def du(self, centre: float) -> np.ndarray:
        """Signed wrapped azimuth distance to ``centre``, in [-0.5, 0.5)."""
        return (self.u - centre + 0.5) % 1.0 - 0.5

    def paint(self, mask: np.ndarray, colour: np.ndarray) -> None:
        self.img[mask] = colour

    def rect(self, u0: float, width: float, v0: float, v1: float, colour: np.ndarray) -> None:
        d = self.du(u0 + width / 2)
        self.paint((np.abs(d) < width / 2) & (self.v >= v0) & (self.v < v1), colour)

    def ellipse(self, uc: float, vc: float, ru: float, rv: float, colour: np.ndarray) -> None:
        self.paint((self.du(uc) / ru) ** 2 + ((self.v - vc) / rv) ** 2 < 1.0, colour)


def _perspective_angle(c: _Canvas, vanishing: int, phase: float) -> np.ndarray:
    """Angle (rad) of floor points around the nearest of ``vanishing`` evenly spaced vanishing points
    on the horizon (0 = straight ahead)."""
    d = ((c.u - phase) * vanishing + 0.5) % 1.0 - 0.5
    return np.arctan2(d * 3.0, np.maximum(c.v - 0.5, 1e-3))


def _scene_corridor(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Walking: beige corridor, doors, ceiling lights, floor with perspective stripes."""
    c = _Canvas.new(h, w, _colour(rng, (0.07, 0.15), (0.12, 0.3), (0.72, 0.9)))
    c.paint(c.v < 0.3, _colour(rng, (0.07, 0.15), (0.02, 0.1), (0.88, 0.98)))
    floor_colour = _colour(rng, (0.0, 1.0), (0.05, 0.25), (0.3, 0.45))
    c.paint(c.v > 0.55, floor_colour)
    angle = _perspective_angle(c, 2, float(rng.uniform(0, 1)))
    n_lines = int(rng.integers(5, 9))
    c.paint((c.v > 0.55) & (np.cos(angle * n_lines) > 0.75), floor_colour + 60.0)
    door = _colour(rng, (0.03, 0.1), (0.4, 0.7), (0.3, 0.5))
    for _ in range(int(rng.integers(5, 10))):
        c.rect(float(rng.uniform(0, 1)), float(rng.uniform(0.025, 0.045)), 0.3, 0.56, door)
    for k in range(int(rng.integers(6, 11))):
        c.rect(k / 8 + float(rng.uniform(0, 0.05)), 0.03, 0.18, 0.22, np.array([255.0, 252.0, 235.0]))
    return c.img


def _scene_track(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Running: blue sky, tree line, green field, red running track with white lanes."""
    sky = _colour(rng, (0.55, 0.62), (0.3, 0.6), (0.8, 0.95))
    c = _Canvas.new(h, w, sky)
    c.img[...] += (c.v[..., None] * 80.0) * (np.array([255.0, 255.0, 255.0]) - sky) / 255.0
    tree_top = 0.45 - 0.04 * sum(np.abs(np.sin(math.pi * int(rng.integers(3, 15)) * c.u + float(rng.uniform(0, 3))))
                                 for _ in range(3)) / 3
    c.paint((c.v > tree_top) & (c.v <= 0.5), _colour(rng, (0.28, 0.38), (0.5, 0.8), (0.2, 0.35)))
    c.paint(c.v > 0.5, _colour(rng, (0.22, 0.33), (0.55, 0.85), (0.45, 0.7)))
    top = 0.62 + 0.03 * np.sin(_TAU * c.u + float(rng.uniform(0, _TAU)))
    track = (c.v > top) & (c.v < 0.95)
    c.paint(track, _colour(rng, (0.98, 1.05), (0.5, 0.75), (0.6, 0.8)))
    lanes = int(rng.integers(4, 7))
    for k in range(lanes + 1):
        line = top + (0.95 - top) * k / lanes
        c.paint(track & (np.abs(c.v - line) < 0.006), np.array([245.0, 245.0, 245.0]))
    return c.img


def _scene_desk(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Sitting down: muted wall, wooden desk with grain, monitor, papers, a mug."""
    c = _Canvas.new(h, w, _colour(rng, (0.0, 1.0), (0.05, 0.2), (0.55, 0.75)))
    wood = _colour(rng, (0.05, 0.1), (0.5, 0.75), (0.4, 0.65))
    desk = c.v > 0.52
    grain = 1.0 + 0.12 * np.sin(_TAU * (c.v * 55.0 + 0.8 * np.sin(_TAU * c.u * int(rng.integers(3, 8)))))
    c.img[desk] = (wood[None, :] * grain[desk][:, None])
    c.paint(c.v > 0.92, wood * 0.6)
    for _ in range(int(rng.integers(1, 3))):
        u0 = float(rng.uniform(0, 1))
        c.rect(u0, 0.11, 0.28, 0.5, np.array([25.0, 25.0, 30.0]))
        c.rect(u0 + 0.008, 0.094, 0.3, 0.47, _colour(rng, (0.5, 0.7), (0.3, 0.7), (0.7, 0.95)))
    for _ in range(int(rng.integers(2, 5))):
        c.rect(float(rng.uniform(0, 1)), float(rng.uniform(0.03, 0.06)), float(rng.uniform(0.58, 0.7)), 0.82,
               np.array([240.0, 240.0, 232.0]))
    c.ellipse(float(rng.uniform(0, 1)), 0.6, 0.015, 0.05, _colour(rng, (0.0, 1.0), (0.6, 0.9), (0.6, 0.9)))
    return c.img


def _scene_room(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Standing up: pastel room, windows, carpet, saturated furniture blobs."""
    c = _Canvas.new(h, w, _colour(rng, (0.0, 1.0), (0.15, 0.3), (0.85, 0.95)))
    c.paint(c.v > 0.62, _colour(rng, (0.0, 1.0), (0.3, 0.5), (0.4, 0.55)))
    for _ in range(int(rng.integers(2, 4))):
        c.rect(float(rng.uniform(0, 1)), float(rng.uniform(0.06, 0.1)), 0.22, 0.45, np.array([185.0, 215.0, 245.0]))
    for _ in range(int(rng.integers(5, 9))):
        c.ellipse(float(rng.uniform(0, 1)), float(rng.uniform(0.55, 0.7)), float(rng.uniform(0.03, 0.07)),
                  float(rng.uniform(0.06, 0.12)), _colour(rng, (0.0, 1.0), (0.6, 0.9), (0.5, 0.8)))
    return c.img


def _scene_pattern(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Looking around: room with bold wallpaper (dots, stripes or checks) and framed pictures."""
    hue = float(rng.uniform(0, 1))
    c = _Canvas.new(h, w, _hsv(hue, float(rng.uniform(0.5, 0.8)), float(rng.uniform(0.7, 0.9))))
    second = _colour(rng, (hue + 0.3, hue + 0.7), (0.4, 0.8), (0.2, 0.45))
    ku, kv = int(rng.integers(24, 48)), float(rng.uniform(10, 18))
    su, sv = np.sin(_TAU * ku * c.u), np.sin(_TAU * kv * c.v)
    kind = int(rng.integers(3))
    pattern = [su * sv > 0.5, np.sin(_TAU * (ku * c.u + kv * c.v)) > 0.3, su * sv > 0][kind]
    c.paint(pattern & (c.v < 0.75), second)
    c.paint(c.v >= 0.75, _colour(rng, (0.05, 0.1), (0.4, 0.6), (0.35, 0.5)))
    for _ in range(int(rng.integers(3, 6))):
        u0, v0 = float(rng.uniform(0, 1)), float(rng.uniform(0.25, 0.4))
        c.rect(u0, 0.07, v0, v0 + 0.16, np.array([30.0, 25.0, 20.0]))
        c.rect(u0 + 0.006, 0.058, v0 + 0.015, v0 + 0.145, _colour(rng, (0.0, 1.0), (0.2, 0.9), (0.4, 1.0)))
    return c.img


def _scene_road(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Cycling: sky, buildings with windows, asphalt with dashed centre line and edge lines."""
    c = _Canvas.new(h, w, _colour(rng, (0.55, 0.65), (0.15, 0.45), (0.75, 0.92)))
    for _ in range(int(rng.integers(8, 14))):
        u0, width, top = float(rng.uniform(0, 1)), float(rng.uniform(0.04, 0.1)), float(rng.uniform(0.18, 0.42))
        c.rect(u0, width, top, 0.5, _colour(rng, (0.0, 0.15), (0.0, 0.35), (0.35, 0.7)))
    windows = (np.sin(_TAU * 90 * c.u) > 0.3) & (np.sin(_TAU * 40 * c.v) > 0.3) & (c.v < 0.48)
    building = np.abs(c.img - c.img[0:1]).sum(axis=2) > 1.0
    c.img[windows & building] *= 0.55
    c.paint(c.v > 0.5, _colour(rng, (0.2, 0.35), (0.3, 0.6), (0.35, 0.55)))
    road = c.v > 0.53
    c.paint(road, _colour(rng, (0.0, 1.0), (0.0, 0.06), (0.28, 0.4)))
    angle = _perspective_angle(c, 4, float(rng.uniform(0, 1)))
    dash = np.sin(_TAU * 0.15 / np.maximum(c.v - 0.5, 1e-3)) > 0
    c.paint(road & (np.abs(angle) < 0.035) & dash, np.array([240.0, 200.0, 40.0]))
    c.paint(road & (np.abs(np.abs(angle) - 0.9) < 0.03), np.array([235.0, 235.0, 235.0]))
    return c.img


def _scene_stairs(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Climbing stairs: concrete wall, steps with dark nosings (spacing grows with depth), handrail."""
    c = _Canvas.new(h, w, _colour(rng, (0.05, 0.12), (0.05, 0.15), (0.6, 0.75)))
    tread = _colour(rng, (0.0, 1.0), (0.0, 0.15), (0.55, 0.75))
    steps = c.v > 0.38
    phase = 0.6 / np.maximum(c.v - 0.3, 1e-3)
    frac = phase % 1.0
    c.paint(steps & (frac < 0.55), tread)
    c.paint(steps & (frac >= 0.55), tread * 0.62)
    c.paint(steps & (frac < 0.06), np.array([35.0, 35.0, 40.0]))
    m = int(rng.integers(2, 5))
    rail = 0.3 + 0.25 * ((c.u * m) % 1.0)
    c.paint(np.abs(c.v - rail) < 0.012, _colour(rng, (0.0, 1.0), (0.5, 0.9), (0.3, 0.6)))
    return c.img


_SCENES: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "walking": _scene_corridor,
    "running": _scene_track,
    "sitting down": _scene_desk,
    "standing up": _scene_room,
    "looking around": _scene_pattern,
    "cycling": _scene_road,
    "climbing stairs": _scene_stairs,
}


def _panorama(activity: str, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A 360° panorama (uint8, H_pan x (W_pan + W) x 3, the first W columns repeated at the right so a
    window never needs wrapping). W_pan covers 2π of yaw; H_pan = _PANO_ROWS·H covers the pitch range."""
    width, height = size
    pano_w = int(round(width * _TAU / _FOV_RAD))
    img = np.clip(_SCENES[activity](rng, _PANO_ROWS * height, pano_w), 0, 255).astype(np.uint8)
    return np.concatenate([img, img[:, :width]], axis=1)


def _render_frames(head: _HeadTrack, segments: Sequence[_Segment], num_frames: int, fps: float,
                   size: tuple[int, int], panos: dict[str, np.ndarray],
                   rng: np.random.Generator) -> Iterator[np.ndarray]:
    """RGB frames (H, W, 3 uint8) at t = i / fps: the current activity's panorama (``panos``, from
    :func:`_panorama`) seen through a window offset by the integrated yaw (horizontal), pitch and head
    height (vertical), plus sensor noise."""
    width, height = size
    pano_w = next(iter(panos.values())).shape[1] - width
    px_per_rad = pano_w / _TAU
    margin = (_PANO_ROWS - 1) * height // 2
    t = np.arange(num_frames) / fps
    yaw, pitch = np.interp(t, head.t, head.yaw), np.interp(t, head.t, head.pitch)
    bob, posture = np.interp(t, head.t, head.bob), np.interp(t, head.t, head.height)
    dx = np.round(yaw * px_per_rad).astype(np.int64) % pano_w
    dy = np.clip(np.round(margin - pitch * px_per_rad + bob * _BOB_PX_PER_M + posture * _HEIGHT_PX_PER_M),
                 0, 2 * margin).astype(np.int64)
    starts = np.array([s.start_sec for s in segments])
    seg = np.clip(np.searchsorted(starts, t, side="right") - 1, 0, len(segments) - 1)
    noise = rng.integers(-3, 4, size=(8, height, width, 3), dtype=np.int16)
    pick, flicker = rng.integers(0, 8, num_frames), rng.integers(-2, 3, num_frames)
    for i in range(num_frames):
        view = panos[segments[seg[i]].activity][dy[i]:dy[i] + height, dx[i]:dx[i] + width]
        yield np.clip(view.astype(np.int16) + noise[pick[i]] + flicker[i], 0, 255).astype(np.uint8)


def _encode_mp4(path: pathlib.Path, frames: Iterator[np.ndarray], rate: Fraction, size: tuple[int, int]) -> None:
    """H.264 (libx264, yuv420p, B-frames), constant frame rate, pts = frame index in a 1/fps time base.

    Deterministic: one thread, and macroblock-tree rate control off (with it on, this libx264 build
    occasionally produced different bitstreams for identical input)."""
    import av  # deferred: importing this module stays cheap

    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = 1 / rate
        stream.codec_context.thread_count = 1
        # one keyframe per second, as in typical camera recordings: sparse seeking stays cheap
        gop = max(1, int(round(float(rate))))
        stream.options = {"preset": "veryfast", "crf": "23", "x264-params": f"mbtree=0:keyint={gop}:min-keyint={gop}"}
        for i, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


# --------------------------------------------------------------------------------------------------
# narrations
# --------------------------------------------------------------------------------------------------

# Two annotators (pass 1, pass 2) with their own phrasings.
_PHRASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "walking": (("walks along the corridor", "walks down the hallway", "strolls through the room"),
                ("walks forward in the corridor", "moves along the hallway", "walks past a door")),
    "running": (("runs on the track", "jogs along the track", "runs forward"),
                ("sprints along the running track", "jogs on the field", "runs past the trees")),
    "sitting down": (("sits down at the desk", "sits on the chair", "looks at the desk"),
                     ("takes a seat at the table", "settles on a chair", "looks down at the table")),
    "standing up": (("stands up from the chair", "gets up", "stands in the room"),
                    ("rises from the seat", "stands up", "stands near the sofa")),
    "looking around": (("looks around the room", "turns the head to the left", "looks at the wall"),
                       ("looks around", "turns around in the room", "glances at the pictures")),
    "cycling": (("rides the bicycle on the road", "cycles along the street", "pedals the bicycle"),
                ("rides a bike down the road", "cycles past the buildings", "steers the bicycle")),
    "climbing stairs": (("climbs the stairs", "walks up the staircase", "holds the handrail"),
                        ("goes up the stairs", "steps up the stairs", "climbs up the steps")),
}
_SUMMARY: dict[str, tuple[str, str]] = {
    "walking": ("walked along a corridor", "was walking in a hallway"),
    "running": ("ran on a track", "was jogging on a running track"),
    "sitting down": ("sat down at a desk", "took a seat at a table"),
    "standing up": ("stood up in a room", "got up from a chair"),
    "looking around": ("looked around a room", "was looking around a decorated room"),
    "cycling": ("cycled on a road", "was riding a bicycle in the street"),
    "climbing stairs": ("climbed a staircase", "was going up the stairs"),
}
_OTHERS = ("#O man X waves at C", "#O woman Y walks past C", "#O person X talks to C", "#O man Y points at the wall")


def _narration_text(activity: str, annotator: int, rng: np.random.Generator) -> str:
    """``#C C <phrase>`` (sometimes with `` #unsure``) or, rarely, an ``#O`` narration."""
    if rng.uniform() < 0.1:
        return str(rng.choice(_OTHERS))
    text = "#C C " + str(rng.choice(_PHRASES[activity][annotator]))
    return text + " #unsure" if rng.uniform() < 0.08 else text


def _narrations(segments: Sequence[_Segment], annotator: int, fps: float,
                rng: np.random.Generator) -> list[dict[str, Any]]:
    """Point narrations every 2-5 s, each strictly inside (≥ 0.3 s from the ends of) its segment."""
    out = []
    for seg in segments:
        t = seg.start_sec + float(rng.uniform(0.3, 1.5))
        while t < seg.end_sec - 0.3:
            ts = round(t, 4)
            out.append({"timestamp_sec": ts, "timestamp_frame": int(round(ts * fps)),
                        "narration_text": _narration_text(seg.activity, annotator, rng),
                        "annotation_uid": _uuid4(rng)})
            t += float(rng.uniform(2.0, 5.0))
    return out


def _summaries(segments: Sequence[_Segment], annotator: int, fps: float, duration: float,
               rng: np.random.Generator) -> list[dict[str, Any]]:
    """One summary over the whole video, or two (split at the middle segment boundary) for >= 30 s."""
    groups = [list(segments)]
    if duration >= 30.0 and len(segments) >= 2:
        cut = len(segments) // 2
        groups = [list(segments[:cut]), list(segments[cut:])]
    out = []
    for g in groups:
        acts = [_SUMMARY[s.activity][annotator] for s in g]
        text = "#summary C " + (acts[0] if len(acts) == 1 else ", then ".join(acts[:-1]) + " and then " + acts[-1])
        start, end = g[0].start_sec, g[-1].end_sec
        out.append({"start_sec": start, "end_sec": end, "start_frame": int(round(start * fps)),
                    "end_frame": int(round(end * fps)), "summary_text": text, "annotation_uid": _uuid4(rng)})
    return out


def _narration_entry(plan: _VideoPlan, fps: float, duration: float, rng: np.random.Generator) -> dict[str, Any]:
    """One video's narration.json entry with the passes chosen in the plan."""
    entry: dict[str, Any] = {"status": "complete"}
    for annotator, name in enumerate(("narration_pass_1", "narration_pass_2")):
        pass_rng = np.random.default_rng(rng.integers(2**63))
        if name in plan.narration_passes:
            entry[name] = {"narrations": _narrations(plan.segments, annotator, fps, pass_rng),
                           "summaries": _summaries(plan.segments, annotator, fps, duration, pass_rng)}
    return entry


# --------------------------------------------------------------------------------------------------
# JSON documents
# --------------------------------------------------------------------------------------------------


def _metadata_doc(plans: Sequence[_VideoPlan], duration: float, num_frames: int, fps: float,
                  size: tuple[int, int]) -> dict[str, Any]:
    """ego4d.json."""
    width, height = size
    videos = []
    for p in plans:
        videos.append({
            "video_uid": p.video_uid,
            "duration_sec": duration,
            "scenarios": sorted({_SCENARIOS[s.activity] for s in p.segments}),
            "device": p.device,
            "physical_setting_name": p.physical_setting,
            "has_imu": p.has_imu,
            "has_gaze": False,
            "split_em": None,
            "split_av": None,
            "split_fho": p.split,
            "video_metadata": {
                "fps": fps, "num_frames": num_frames, "video_codec": "h264",
                "display_resolution_width": width, "display_resolution_height": height,
                "sample_resolution_width": width, "sample_resolution_height": height,
                "mp4_duration_sec": duration, "video_start_sec": 0.0, "video_duration_sec": duration,
                "audio_codec": None,
            },
        })
    return {"version": "v2", "description": "A synthetic mmloader sample in the Ego4D v2 layout (not real Ego4D data)",
            "date": "2022-01-01", "videos": videos, "clips": []}


def _manifest_doc(videos: list[dict[str, Any]], arguments: dict[str, Any]) -> dict[str, Any]:
    """sample_manifest.json (sample-only: what was generated and which defects were injected where)."""
    return {
        "generator": "mmloader.samples.ego4d",
        "manifest_version": MANIFEST_VERSION,
        "arguments": arguments,
        "activities": list(ACTIVITIES),
        "defect_kinds": list(DEFECT_KINDS),
        "imu": {"rate_hz": IMU_RATE_HZ, "frame": "x right, y down, z forward (head-fixed)",
                "accl": "m/s^2, linear acceleration + gravity (+9.81 on the down axis when still and level)",
                "gyro": "rad/s, body angular velocity", "clock": "canonical_timestamp_ms = video time in ms"},
        "videos": videos,
    }


def _manifest_entry(plan: _VideoPlan, imu_info: dict[str, Any]) -> dict[str, Any]:
    """One video of sample_manifest.json."""
    return {
        "video_uid": plan.video_uid,
        "split": plan.split,
        "has_imu": plan.has_imu,
        "has_narrations": bool(plan.narration_passes),
        "narration_passes": list(plan.narration_passes),
        "defects": imu_info.get("defects", []),
        "defect_rows": imu_info.get("defect_rows", {}),
        "gaps_sec": imu_info.get("gaps_sec", []),
        "components": imu_info.get("components", []),
        "imu_start_sec": imu_info.get("imu_start_sec"),
        "imu_end_sec": imu_info.get("imu_end_sec"),
        "imu_rows": imu_info.get("rows", 0),
        "activities": [s.as_dict() for s in plan.segments],
    }


def _write_json(path: pathlib.Path, obj: Any) -> None:
    """Deterministic JSON (2-space indent, key order as built, trailing newline)."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
