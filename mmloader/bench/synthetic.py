"""Ego4D-like source data for the benchmark, generated with PyAV: H.264 mp4s (libx264, a fixed GOP, no scene-cut
keyframes) whose pictures do not compress away, matching 200 Hz IMU CSVs and an ``ego4d.json``, in the Ego4D layout
(``v2/ego4d.json``, ``v2/full_scale/<uid>.mp4``, ``v2/imu/<uid>.csv``); then stores prepared from it by the Ego4D
recipe (as is, or through a transcode profile). Everything is built once per parameter set under a work folder.

The generation parameters live on an ``argparse.Namespace`` (``mmloader bench --synthetic``'s options): ``videos``,
``seconds`` (per video), ``video_size`` ([W, H] px), ``fps``, ``gop`` (frames), ``preset``, ``crf``, ``grain``
(levels), ``seed``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np

from ..recipes import get_adapter
from .util import built_once

IMU_HZ = 200.0
IMU_HEADER = ("component_idx,component_timestamp_ms,canonical_timestamp_ms,gyro_x,gyro_y,gyro_z,"
              "accl_x,accl_y,accl_z")
CONTENT_VERSION = 1  # bump when the generated pictures change: a new folder name, a fresh generation
Log = Callable[[str], None]


def _blocky_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """(H, W, 3) float32 noise in [-1, 1], constant over ``cell`` × ``cell`` pixel squares."""
    h, w = -(-shape[0] // cell), -(-shape[1] // cell)
    low = rng.uniform(-1.0, 1.0, (h, w, 3)).astype(np.float32)
    return np.repeat(np.repeat(low, cell, axis=0), cell, axis=1)[: shape[0], : shape[1]]


def _texture(rng: np.random.Generator, shape: tuple[int, int], unit: int) -> np.ndarray:
    """(H, W, 3) uint8: a colour gradient plus noise at three scales (``unit``: the finest cell, px)."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3).astype(np.float32)
    grad = np.stack([np.sin(2 * np.pi * x / w * (k + 1) + y / h * 3.0 + phase[k]) for k in range(3)], axis=-1)
    img = 128 + 45 * grad
    for cell, amp in ((unit * 16, 40), (unit * 4, 28), (unit, 16)):
        img += amp * _blocky_noise(rng, shape, cell)
    return np.clip(img, 0, 255).astype(np.uint8)


class Scene:
    """Frames of a panning camera over a wide textured scene (a cut each time the pan wraps), with textured blocks
    moving on their own paths and per-frame sensor grain: content with real motion and detail, so that an encoder
    spends realistic bits and a decoder realistic time on it. ``size`` = (W, H) px; ``frame(i)`` is (H, W, 3)
    uint8 RGB at time ``i / fps`` s."""

    BLOCKS = 6

    def __init__(self, size: tuple[int, int], fps: float, seed: int, grain: int = 6):
        self.w, self.h = size
        self.fps = fps
        rng = np.random.default_rng(seed)
        unit = max(2, self.h // 180)
        self.margin = max(8, self.h // 10)
        self.world = _texture(rng, (self.h + 2 * self.margin, 2 * self.w), unit)
        bw, bh = max(8, self.w // 8), max(8, self.h // 6)
        self.blocks = [_texture(rng, (bh, bw), max(1, unit // 2)) for _ in range(self.BLOCKS)]
        self.block_pos = rng.uniform(0, 1, (self.BLOCKS, 2))
        self.block_vel = rng.uniform(-0.25, 0.25, (self.BLOCKS, 2))  # frame fractions per second
        self.grain = rng.integers(-grain, grain + 1, (8, self.h, self.w, 3), dtype=np.int16)
        self.pick = rng.integers(0, 8, 1 << 16)
        self.pan_speed = self.w / 20.0  # px/s: a cut every 20 s
        self.sway = rng.uniform(0, 2 * np.pi, 2)

    def frame(self, i: int) -> np.ndarray:
        t = i / self.fps
        dx = int(round(self.pan_speed * t + 0.08 * self.w * math.sin(0.9 * t + self.sway[0]))) % self.w
        dy = int(round(self.margin * (1 + 0.8 * math.sin(1.7 * t + self.sway[1]))))
        img = self.world[dy:dy + self.h, dx:dx + self.w].astype(np.int16)
        for b, tex in enumerate(self.blocks):
            bh, bw = tex.shape[:2]
            p = np.abs(((self.block_pos[b] + self.block_vel[b] * t) % 2.0) - 1.0)  # bounce in [0, 1]
            y0, x0 = int(p[0] * (self.h - bh)), int(p[1] * (self.w - bw))
            img[y0:y0 + bh, x0:x0 + bw] = tex
        img += self.grain[self.pick[i % len(self.pick)]]
        return np.clip(img, 0, 255).astype(np.uint8)


def encode_video(path: Path, args: argparse.Namespace, seed: int, log: Log) -> int:
    """One H.264 mp4 of ``args.seconds`` s (libx264, keyint = min-keyint = ``args.gop``, no scene cuts); returns
    its frame count."""
    import av

    rate_ = Fraction(args.fps).limit_denominator(1001)
    n = int(round(args.seconds * args.fps))
    scene = Scene(tuple(args.video_size), args.fps, seed, args.grain)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate_)
        stream.width, stream.height = args.video_size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = 1 / rate_
        stream.options = {"preset": args.preset, "crf": str(args.crf),
                          "x264-params": f"keyint={args.gop}:min-keyint={args.gop}:scenecut=0"}
        step = max(1, n // 10)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(scene.frame(i), format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate_
            container.mux(stream.encode(frame))
            if (i + 1) % step == 0:
                log(f"  {path.name}: {i + 1}/{n} frames encoded")
        container.mux(stream.encode(None))
    return n


def write_imu(path: Path, seconds: float, rng: np.random.Generator) -> None:
    """A clean 200 Hz IMU CSV on the canonical clock (one component) covering the whole video."""
    t = np.arange(int(seconds * IMU_HZ)) / IMU_HZ
    gyro = 0.5 * np.sin(np.outer(t, [1.3, 0.7, 2.1]) + rng.uniform(0, 6, 3)) + rng.normal(0, 0.01, (t.size, 3))
    accl = np.sin(np.outer(t, [2.0, 1.1, 3.3]) + rng.uniform(0, 6, 3)) + rng.normal(0, 0.04, (t.size, 3))
    accl[:, 2] += 9.81
    canon = t * 1000.0
    table = np.column_stack([np.zeros_like(t), canon + 1.6e12, canon, gyro, accl])
    np.savetxt(path, table, fmt=["%d", "%.3f", "%.3f"] + ["%.6f"] * 6, delimiter=",", header=IMU_HEADER,
               comments="")


def generate_source(root: Path, args: argparse.Namespace, log: Log) -> None:
    """The Ego4D layout under ``root``: v2/ego4d.json, v2/full_scale/<uid>.mp4, v2/imu/<uid>.csv."""
    (root / "v2" / "full_scale").mkdir(parents=True)
    (root / "v2" / "imu").mkdir(parents=True)
    rng = np.random.default_rng(args.seed)
    videos = []
    for k in range(args.videos):
        uid = f"bench-{k:03d}"
        log(f"generating {uid}: {args.seconds:g} s at {args.video_size[0]}x{args.video_size[1]}")
        n = encode_video(root / "v2" / "full_scale" / f"{uid}.mp4", args, args.seed * 1000 + k, log)
        write_imu(root / "v2" / "imu" / f"{uid}.csv", args.seconds, rng)
        videos.append({"video_uid": uid, "duration_sec": n / args.fps, "has_imu": True, "split_fho": "train",
                       "video_metadata": {"fps": args.fps, "num_frames": n, "video_codec": "h264",
                                          "video_start_sec": 0.0}})
    (root / "v2" / "ego4d.json").write_text(json.dumps({"version": "v2", "videos": videos, "clips": []}, indent=1))


def source_name(args: argparse.Namespace) -> str:
    """The folder name of a generated source: every generation parameter, so that other parameters are another
    folder."""
    return (f"ego4d-like-v{args.videos}-s{args.seconds:g}-{args.video_size[0]}x{args.video_size[1]}-fps{args.fps:g}"
            f"-gop{args.gop}-{args.preset}-crf{args.crf:g}-grain{args.grain}-seed{args.seed}-c{CONTENT_VERSION}")


def source_and_store(work: Path, args: argparse.Namespace, log: Log) -> tuple[Path, str]:
    """The generated source and its store (the Ego4D recipe, media referenced in place) under ``work``, each made
    once per parameter set."""
    name = source_name(args)
    src = built_once(work / name, lambda p: generate_source(p, args, log))

    def prepare(dst: Path) -> None:
        log("preparing the store with the Ego4D recipe")
        get_adapter("ego4d").prepare(str(src), str(dst), progress=False)

    store = built_once(work / (name + "-store"), prepare)
    return src, str(store)


def profile_available() -> bool:
    """True when the Ego4D recipe takes ``video_profile=`` (transcode profiles)."""
    import inspect

    return "video_profile" in inspect.signature(get_adapter("ego4d").prepare).parameters


def profile_digest(profile: str) -> str:
    """A short hash of what the transcode profile named ``profile`` does (ValueError: no such profile), so that a
    changed definition is another folder."""
    from ..video.transcode import resolve_profile

    desc = resolve_profile(profile).describe()
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:8]


def profile_store(work: Path, src: Path, profile: str, log: Log) -> str:
    """The store prepared from ``src`` with the transcode profile ``profile`` (``video_profile=``), made once
    under ``work`` in a folder named by the source, the profile and its definition."""
    def prepare(dst: Path) -> None:
        log(f"preparing a second store with video profile {profile!r} (transcoding)")
        get_adapter("ego4d").prepare(str(src), str(dst), progress=False, video_profile=profile)

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in profile)
    return str(built_once(work / f"{src.name}-store-profile-{safe}-{profile_digest(profile)}", prepare))
