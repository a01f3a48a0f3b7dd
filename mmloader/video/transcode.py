"""Transcode profiles: a recording's video re-encoded once, at prepare time, for training that decodes video every
epoch in a shuffled order.

Real-world video (Ego4D: 1080p H.264 with a keyframe every ~8 s) makes every random read seek back to a keyframe and
decode up to a GOP of full-size frames to return one. A profile trades disk and one prepare-time pass for reads
that cost a few small frames each: a short GOP, the training resolution, optionally a lower frame rate (as the
original IMU2CLIP trained on 10-fps 224² copies).

Contract (``transcode_video``):

- every kept frame keeps its **capture time**: the output's pts are the source frame's pts, in the source stream's
  own time base, so that a frame's time in the store (and so alignment with IMU and narrations) is unchanged. The
  output is probed after writing and its times checked against the source's (``max_time_error_ns`` must be below
  half a source frame; else ``MediaError``).
- ``fps=None`` keeps every source frame; ``fps=f`` keeps, for each point of a grid at ``f`` Hz from the first frame,
  the source frame nearest to it (the same rule as window frame selection, ``nearest_frames``), each at most once.
- frames are converted to yuv420p at the output size by FFmpeg's scaler (area filter) once, then encoded with
  libx264: a keyframe exactly every ``gop`` output frames (no scene-cut keyframes), no B-frames.
- the output is written to a local path; the caller moves it into the store.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping

import av
import numpy as np

from ..errors import MediaError
from ..fsutil import get_fs
from .probe import VideoInfo, open_container, probe_video, ticks_to_ns
from .select import nearest_frames

Size = tuple[int, int]  # (H, W) px


@dataclass(frozen=True)
class VideoProfile:
    """How a video is re-encoded: ``size`` = (H, W) px exactly (the same stretch windows apply with ``size=``),
    or ``short_side`` px with the aspect ratio kept (even dimensions), or neither (native size); ``gop``: output
    frames between keyframes; ``fps``: None keeps every frame; ``crf``/``preset``: libx264 quality and speed."""

    name: str
    gop: int
    size: Size | None = None
    short_side: int | None = None
    fps: float | None = None
    crf: int = 20
    preset: str = "veryfast"
    codec: str = "h264"

    def __post_init__(self) -> None:
        where = f"video profile {self.name!r}"
        if not isinstance(self.gop, int) or not 1 <= self.gop <= 600:
            raise ValueError(f"{where}: gop must be an int in [1, 600] frames, got {self.gop!r}")
        if self.size is not None and self.short_side is not None:
            raise ValueError(f"{where}: give size or short_side, not both")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 16 or any(s % 2 for s in self.size)):
            raise ValueError(f"{where}: size must be (H, W), even, each >= 16 px, got {self.size!r}")
        if self.short_side is not None and (self.short_side < 16 or self.short_side % 2):
            raise ValueError(f"{where}: short_side must be even and >= 16 px, got {self.short_side!r}")
        if self.fps is not None and not (0 < self.fps <= 240):
            raise ValueError(f"{where}: fps must be in (0, 240] or None, got {self.fps!r}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"{where}: crf must be in [0, 51], got {self.crf!r}")
        if self.codec != "h264":
            raise ValueError(f"{where}: codec must be 'h264', got {self.codec!r}")

    def output_size(self, width: int, height: int) -> Size:
        """(H, W) of the output for a ``width`` × ``height`` source."""
        if self.size is not None:
            return (int(self.size[0]), int(self.size[1]))
        if self.short_side is None:
            return (height - height % 2, width - width % 2)
        scale = self.short_side / min(width, height)
        even = lambda v: max(2, int(round(v * scale / 2)) * 2)  # noqa: E731
        return (even(height), even(width))

    def describe(self) -> dict[str, Any]:
        """The profile as plain values (recorded in the store's manifest options and prepare report)."""
        out = dataclasses.asdict(self)
        out["size"] = list(self.size) if self.size is not None else None
        return out


VIDEO_PROFILES: dict[str, VideoProfile] = {
    p.name: p for p in (
        VideoProfile("224-gop10", gop=10, size=(224, 224)),
        VideoProfile("256-gop10", gop=10, short_side=256),
        VideoProfile("224-10fps", gop=10, size=(224, 224), fps=10.0),
    )
}
"""Named profiles. ``224-gop10``: every frame at 224², a keyframe every 10 frames (shuffled training at the
windows' usual ``size=(224, 224)``); ``256-gop10``: short side 256, aspect kept (for random crops);
``224-10fps``: the original IMU2CLIP copies, 10 frames/s at 224², a keyframe each second."""


def resolve_profile(profile: str | VideoProfile | Mapping[str, Any] | None) -> VideoProfile | None:
    """A ``VideoProfile`` from a name of ``VIDEO_PROFILES``, a profile, a ``describe()`` dict, or None."""
    if profile is None or isinstance(profile, VideoProfile):
        return profile
    if isinstance(profile, Mapping):
        kw = dict(profile)
        if kw.get("size") is not None:
            kw["size"] = tuple(kw["size"])
        return VideoProfile(**kw)
    if isinstance(profile, str) and profile in VIDEO_PROFILES:
        return VIDEO_PROFILES[profile]
    raise ValueError(f"unknown video profile {profile!r}; known: {', '.join(VIDEO_PROFILES)} "
                     "(or pass a mmloader.video.VideoProfile)")


def kept_frames(pts_ns: np.ndarray, fps: float | None) -> np.ndarray:
    """Indices (ascending, unique) of the source frames a profile keeps: all, or those nearest a grid at ``fps``
    Hz starting at the first frame. ``pts_ns`` sorted ascending."""
    pts_ns = np.asarray(pts_ns, dtype=np.int64)
    if fps is None or pts_ns.size == 0:
        return np.arange(pts_ns.size)
    step = 1e9 / fps
    grid = pts_ns[0] + np.round(np.arange(int((pts_ns[-1] - pts_ns[0]) / step) + 1) * step).astype(np.int64)
    return np.unique(nearest_frames(pts_ns, grid)[0])


class _Encoder:
    """libx264 into a local mp4: pts in ``tb`` ticks (the source's time base), fixed GOP, no B-frames."""

    def __init__(self, path: str, profile: VideoProfile, hw: Size, tb: Fraction, rate: Fraction):
        self.container = av.open(path, mode="w", format="mp4", options={"movie_timescale": str(tb.denominator)})
        stream = self.container.add_stream("libx264", rate=rate)
        stream.height, stream.width = hw
        stream.pix_fmt = "yuv420p"
        stream.time_base = tb
        stream.codec_context.time_base = tb
        stream.options = {"crf": str(profile.crf), "preset": profile.preset, "g": str(profile.gop),
                          "keyint_min": str(profile.gop), "sc_threshold": "0", "bf": "0"}
        self.stream, self.hw, self.tb = stream, hw, tb

    def write(self, frame: av.VideoFrame, pts: int) -> None:
        out = frame.reformat(width=self.hw[1], height=self.hw[0], format="yuv420p", interpolation="AREA")
        out.pts, out.time_base = pts, self.tb
        for packet in self.stream.encode(out):
            self.container.mux(packet)

    def close(self) -> None:
        try:
            for packet in self.stream.encode(None):
                self.container.mux(packet)
        finally:
            self.container.close()


def _encode(container: Any, src: VideoInfo, keep: np.ndarray, out_path: str, profile: VideoProfile,
            url: str) -> list[int]:
    """Decode the source once, in order, and encode the kept frames; returns their source pts (ns)."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    tb = Fraction(stream.time_base.numerator, stream.time_base.denominator)
    wanted = set(src.pts_ns[keep].tolist())
    rate = Fraction(profile.fps if profile.fps else src.fps).limit_denominator(1001) or Fraction(30)
    encoder = _Encoder(out_path, profile, profile.output_size(src.width, src.height), tb, rate)
    written: list[int] = []
    try:
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = int(ticks_to_ns(np.array([frame.pts], dtype=np.int64), tb)[0])
            if t in wanted and (not written or t > written[-1]):
                encoder.write(frame, int(frame.pts))
                written.append(t)
    except av.error.FFmpegError as e:
        raise MediaError(url, f"decoding failed after {len(written)} frames ({e})", "a decodable video") from None
    finally:
        encoder.close()
    return written


def transcode_video(url: str, out_path: str, profile: str | VideoProfile, *,
                    storage_options: Mapping[str, Any] | None = None) -> tuple[VideoInfo, dict[str, Any]]:
    """Re-encode the first video stream of ``url`` into the local mp4 ``out_path`` with ``profile``.

    Returns the output's probed ``VideoInfo`` (its pts are source capture times, ns) and a report: the profile,
    source and output frame counts and sizes, ``max_time_error_ns`` (output pts vs the kept source frames' pts),
    bytes, seconds. Raises MediaError naming the file when the source cannot be read or a kept frame's time did
    not survive (it would move the frame against the other modalities); ``out_path`` is removed then.
    """
    prof = resolve_profile(profile)
    assert prof is not None
    t0 = time.perf_counter()
    src = probe_video(url, storage_options)
    keep = kept_frames(src.pts_ns, prof.fps)
    container, fobj = open_container(*get_fs(url, **(storage_options or {})), url, "a playable video file")
    try:
        written = np.asarray(_encode(container, src, keep, out_path, prof, url), dtype=np.int64)
        if written.size != keep.size:
            raise MediaError(url, f"{written.size} of the {keep.size} frames to keep were decoded",
                             "every indexed frame decodable")
        out = probe_video(out_path)
        if out.num_frames != written.size:
            raise MediaError(out_path, f"the transcoded file has {out.num_frames} frames, {written.size} were "
                             "written", "one output frame per kept frame")
        err = int(np.abs(out.pts_ns - written).max())
        period = float(np.median(np.diff(src.pts_ns))) if src.num_frames > 1 else 1e9
        if err > period / 2:
            raise MediaError(out_path, f"frame times moved by up to {err} ns in the transcode (half a source frame "
                             f"is {period / 2:.0f} ns)", "the source's capture times kept")
    except BaseException:
        if os.path.exists(out_path):
            os.remove(out_path)
        raise
    finally:
        container.close()
        if fobj is not None:
            fobj.close()
    report = {"profile": prof.describe(), "source_frames": src.num_frames, "frames": out.num_frames,
              "source_size": [src.width, src.height], "size": [out.width, out.height], "source_codec": src.codec,
              "keyframes": int(out.keyframe.sum()), "max_time_error_ns": err,
              "bytes": os.path.getsize(out_path), "transcode_sec": round(time.perf_counter() - t0, 3)}
    return out, report
