"""Shared fixtures: small, deterministic, real files (mp4 encoded with PyAV, CSV, JSON)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import av
import numpy as np
import pytest

from mmloader.recipes.ego4d.imu import HEADER


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never write to the user's cache from tests."""
    monkeypatch.setenv("MMLOADER_CACHE_DIR", str(tmp_path_factory.mktemp("mmcache")))


def write_mp4(path: Path, seconds: float = 2.0, fps: int = 10, size: tuple[int, int] = (64, 48), codec: str = "libx264") -> Path:
    """A real H.264 (or other codec) file whose frame k has mean brightness ~ 5*k."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(round(seconds * fps))
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height = size
        s.pix_fmt = "yuv420p"
        for k in range(n):
            img = np.full((size[1], size[0], 3), (5 * k) % 256, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def imu_rows(seconds: float, hz: float = 200.0, start_ms: float = 0.0, component: int = 0, offset_ms: float = 5e6):
    """Clean rows: canonical ms = t, accl = (t_sec, 0, 9.81), gyro = (0.1, 0.2, 0.3)."""
    n = int(seconds * hz)
    rows = []
    for i in range(n):
        t = start_ms + i * 1000.0 / hz
        rows.append([component, t + offset_ms, t, 0.1, 0.2, 0.3, t / 1000.0, 0.0, 9.81])
    return rows


def write_csv(path: Path, rows, header=HEADER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for r in rows:
            f.write(",".join("" if v is None else (v if isinstance(v, str) else f"{v:.6f}" if isinstance(v, float) else str(v)) for v in r) + "\n")
    return path


def make_ego4d_tree(root: Path, uids=("vid-a", "vid-b"), seconds: float = 2.0, imu=True, narrations=True) -> Path:
    """A minimal Ego4D download: v2/ego4d.json, full_scale mp4s, IMU CSVs, narration.json."""
    videos = []
    narr = {}
    for i, uid in enumerate(uids):
        write_mp4(root / "v2" / "full_scale" / f"{uid}.mp4", seconds=seconds)
        if imu:
            write_csv(root / "v2" / "imu" / f"{uid}.csv", imu_rows(seconds))
        videos.append({
            "video_uid": uid, "duration_sec": seconds, "has_imu": imu, "split_fho": "train" if i == 0 else "val",
            "video_metadata": {"fps": 10.0, "num_frames": int(seconds * 10), "video_codec": "h264", "video_start_sec": 0.0},
        })
        narr[uid] = {"status": "complete", "narration_pass_1": {
            "narrations": [{"timestamp_sec": 0.5, "timestamp_frame": 5, "narration_text": "#C C walks along the corridor",
                            "annotation_uid": f"{uid}-n1"}],
            "summaries": [{"start_sec": 0.0, "end_sec": seconds, "summary_text": "#summary C walked", "annotation_uid": f"{uid}-s"}]}}
    (root / "v2").mkdir(parents=True, exist_ok=True)
    (root / "v2" / "ego4d.json").write_text(json.dumps({"version": "v2", "videos": videos, "clips": []}))
    if narrations:
        (root / "v2" / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "v2" / "annotations" / "narration.json").write_text(json.dumps(narr))
    return root


@pytest.fixture
def ego4d_tree(tmp_path) -> Path:
    return make_ego4d_tree(tmp_path / "ego4d")


def store_files(path: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
