"""Arguments and the dataset plan: uids, splits, the no-IMU video, defective CSVs, narration passes and
activity segments (all drawn from the plan RNG, in this order)."""

from __future__ import annotations

import math
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from .constants import ACTIVITIES

__all__ = ["Segment", "VideoPlan", "plan_dataset", "uuid4", "validate_args"]

_SEGMENT_SEC = (8.0, 20.0)
_MIN_LAST_SEGMENT_SEC = 4.0


def validate_args(videos: Any, seconds: Any, seed: Any, defect_fraction: Any, fps: Any, size: Any) -> None:
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
class Segment:
    """One activity over [start_sec, end_sec) of canonical video time."""

    start_sec: float
    end_sec: float
    activity: str

    def as_dict(self) -> dict[str, Any]:
        return {"start_sec": self.start_sec, "end_sec": self.end_sec, "activity": self.activity}


@dataclass(frozen=True)
class VideoPlan:
    """Everything decided at dataset level for one video."""

    video_uid: str
    split: str
    has_imu: bool
    defective: bool
    narration_passes: tuple[str, ...]  # () = absent from narration.json
    segments: tuple[Segment, ...]
    device: str
    physical_setting: str


def uuid4(rng: np.random.Generator) -> str:
    """A uuid4-formatted string drawn from ``rng`` (never from the OS)."""
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def plan_dataset(rng: np.random.Generator, videos: int, duration: float, defect_fraction: float) -> list[VideoPlan]:
    """Uids, splits, which video lacks IMU, which CSVs are defective, narration passes, segments."""
    uids = [uuid4(rng) for _ in range(videos)]
    splits = _assign_splits(rng, videos)
    no_imu = 1 + int(rng.integers(videos - 1))
    imu_videos = [i for i in range(videos) if i != no_imu]
    n_defective = _defect_count(defect_fraction, videos, len(imu_videos))
    defective = {int(i) for i in rng.choice(imu_videos, size=n_defective, replace=False)} if n_defective else set()
    passes = _assign_narration_passes(rng, videos, no_imu)
    segments = _plan_segments(rng, videos, duration)
    settings = [f"synthetic_site_{int(rng.integers(1, 6))}" for _ in range(videos)]
    return [
        VideoPlan(video_uid=uids[i], split=splits[i], has_imu=i != no_imu, defective=i in defective,
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


def _plan_segments(rng: np.random.Generator, videos: int, duration: float) -> list[tuple[Segment, ...]]:
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
        segs: list[Segment] = []
        t = 0.0
        while duration - t > 1e-9:
            end = round(t + float(rng.uniform(lo, hi)), 3)
            if duration - end < min_last:
                end = duration
            segs.append(Segment(round(t, 3), end, draw(segs[-1].activity if segs else None)))
            t = end
        out.append(tuple(segs))
    return out

