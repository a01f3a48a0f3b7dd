"""Video: frames cut from the activity panoramas along the head track, encoded as deterministic H.264 mp4."""

from __future__ import annotations

import pathlib
from fractions import Fraction
from typing import Iterator, Sequence

import numpy as np

from .constants import TAU
from .motion import HeadTrack
from .plan import Segment
from .scenes import PANO_ROWS

__all__ = ["encode_mp4", "render_frames"]

_BOB_PX_PER_M = 60.0  # vertical bob in the image (exaggerated: a distant scene would barely move)
_HEIGHT_PX_PER_M = 60.0  # posture height in the image


def render_frames(head: HeadTrack, segments: Sequence[Segment], num_frames: int, fps: float,
                  size: tuple[int, int], panos: dict[str, np.ndarray],
                  rng: np.random.Generator) -> Iterator[np.ndarray]:
    """RGB frames (H, W, 3 uint8) at t = i / fps: the current activity's panorama (``panos``, from
    :func:`panorama`) seen through a window offset by the integrated yaw (horizontal), pitch and head
    height (vertical), plus sensor noise."""
    width, height = size
    pano_w = next(iter(panos.values())).shape[1] - width
    px_per_rad = pano_w / TAU
    margin = (PANO_ROWS - 1) * height // 2
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


def encode_mp4(path: pathlib.Path, frames: Iterator[np.ndarray], rate: Fraction, size: tuple[int, int]) -> None:
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
