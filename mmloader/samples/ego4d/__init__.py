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

The generator is split along its sections: ``plan`` (arguments, splits, segments, defective CSVs),
``motion`` (head motion per activity), ``imu`` (sensor readings, gaps, CSV and row defects), ``scenes`` and
``video`` (panoramas, frames, H.264), ``text`` (narrations) and ``documents`` (ego4d.json, the manifest).
Every part draws from its own spawned RNG stream, in a fixed order, so the output is byte-identical.
"""

from __future__ import annotations

import json
import os
import pathlib
from fractions import Fraction
from typing import Any

import numpy as np
from tqdm import tqdm

from .constants import ACTIVITIES, DEFECT_KINDS, IMU_HEADER, MANIFEST_NAME
from .constants import GRAVITY, IMU_RATE_HZ, MANIFEST_VERSION  # noqa: F401  (attributes of the old module)
from .documents import manifest_doc, manifest_entry, metadata_doc, write_json
from .imu import write_imu_csv
from .motion import simulate_head
from .plan import plan_dataset, validate_args
from .scenes import panorama
from .text import narration_entry
from .video import encode_mp4, render_frames

__all__ = [
    "ACTIVITIES",
    "DEFECT_KINDS",
    "IMU_HEADER",
    "generate_ego4d_sample",
    "load_sample_manifest",
    "sample_defects",
]


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
    validate_args(videos, seconds, seed, defect_fraction, fps, size)
    root = pathlib.Path(out_dir)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not an empty directory; choose a new output directory")
    rate = Fraction(str(float(fps))).limit_denominator(100_000)
    num_frames = int(round(seconds * float(rate)))
    duration = num_frames / float(rate)
    width, height = int(size[0]), int(size[1])

    seq = np.random.SeedSequence(seed)
    plan_seq, scene_seq, *video_seqs = seq.spawn(2 + videos)
    plans = plan_dataset(np.random.default_rng(plan_seq), videos, duration, defect_fraction)
    # One place per activity, shared by every video of the dataset (as recurring scenario locations).
    panoramas = {a: panorama(a, np.random.default_rng(s), (width, height))
                 for a, s in zip(ACTIVITIES, scene_seq.spawn(len(ACTIVITIES)))}

    v2 = root / "v2"
    for sub in ("full_scale", "imu", "annotations"):
        (v2 / sub).mkdir(parents=True, exist_ok=True)

    narrations: dict[str, Any] = {}
    manifest_videos: list[dict[str, Any]] = []
    for plan, vseq in tqdm(list(zip(plans, video_seqs)), desc="ego4d sample", unit="video", disable=not progress):
        motion_seq, imu_seq, frame_seq, text_seq, defect_seq = vseq.spawn(5)
        head = simulate_head(plan.segments, duration, np.random.default_rng(motion_seq))
        frames = render_frames(head, plan.segments, num_frames, float(rate), (width, height), panoramas,
                               np.random.default_rng(frame_seq))
        encode_mp4(v2 / "full_scale" / f"{plan.video_uid}.mp4", frames, rate, (width, height))
        imu_info: dict[str, Any] = {}
        if plan.has_imu:
            imu_info = write_imu_csv(v2 / "imu" / f"{plan.video_uid}.csv", head, duration, plan.defective,
                                     np.random.default_rng(imu_seq), np.random.default_rng(defect_seq))
        if plan.narration_passes:
            narrations[plan.video_uid] = narration_entry(plan, float(rate), duration, np.random.default_rng(text_seq))
        manifest_videos.append(manifest_entry(plan, imu_info))

    write_json(v2 / "ego4d.json", metadata_doc(plans, duration, num_frames, float(rate), (width, height)))
    write_json(v2 / "annotations" / "narration.json", narrations)
    write_json(v2 / "annotations" / "sample_activity_segments.json",
               {p.video_uid: [s.as_dict() for s in p.segments] for p in plans})
    write_json(root / MANIFEST_NAME, manifest_doc(manifest_videos, {
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
