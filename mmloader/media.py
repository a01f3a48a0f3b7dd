"""Probing media files with PyAV: per-frame presentation timestamps, size, codec.

Times are int64 nanoseconds of the stream's presentation clock (pts × time_base), never shifted to
start at zero.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from .errors import MediaError
from .fsutil import get_fs, is_local


@dataclass(frozen=True)
class VideoInfo:
    """What a video stream holds. ``pts_ns`` sorted ascending, one per frame."""

    pts_ns: np.ndarray
    keyframe: np.ndarray
    fps: float
    width: int
    height: int
    codec: str

    @property
    def num_frames(self) -> int:
        return int(self.pts_ns.shape[0])


def ticks_to_ns(ticks: np.ndarray, time_base: Fraction) -> np.ndarray:
    """Exact conversion of stream ticks to int64 ns (rounded to nearest), without int64 overflow:
    ``ticks × num × 1e9`` can exceed 2**63 for fine time bases, so the division is done in two steps."""
    t = np.asarray(ticks, dtype=np.int64)
    num, den = int(time_base.numerator), int(time_base.denominator)
    q, r = np.divmod(t * np.int64(num), np.int64(den)) if abs(int(t.max(initial=0))) < 2**62 // max(num, 1) else (None, None)
    if q is None:  # astronomically large tick counts: Python integers
        return np.array([(int(x) * num * 1_000_000_000 * 2 + den) // (2 * den) for x in t], dtype=np.int64)
    return q * np.int64(1_000_000_000) + (r * np.int64(1_000_000_000) + den // 2) // den


def probe_video(url: str | os.PathLike) -> VideoInfo:
    """Demux every packet of the first video stream (no decoding but one frame) and return its index.

    Raises MediaError naming the file when it cannot be opened, has no video stream, is truncated
    (a packet lies beyond the end of the file) or its first frame cannot be decoded.
    """
    url = os.fspath(url)
    fs, path = get_fs(url)
    try:
        file_size = fs.size(path)
    except FileNotFoundError:
        raise MediaError(url, "file not found", "an mp4 video file") from None
    fobj = None
    try:
        if is_local(fs):
            container = av.open(path, mode="r")
        else:
            fobj = fs.open(path, "rb")
            container = av.open(fobj, mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise MediaError(url, f"cannot open as media ({e})", "a playable mp4 with a video stream") from None
    try:
        if not container.streams.video:
            raise MediaError(url, "has no video stream", "an mp4 with one video stream")
        stream = container.streams.video[0]
        tb = stream.time_base
        pts, key = [], []
        try:
            for packet in container.demux(stream):
                if packet.pts is None:
                    continue
                if packet.pos is not None and packet.pos >= 0 and packet.pos + packet.size > file_size:
                    raise MediaError(
                        url,
                        f"truncated: frame at byte {packet.pos} (+{packet.size}) lies beyond the end of the "
                        f"file ({file_size} bytes)",
                        "a complete file",
                    )
                pts.append(packet.pts)
                key.append(bool(packet.is_keyframe))
        except av.error.FFmpegError as e:
            raise MediaError(url, f"demuxing failed after {len(pts)} frames ({e})", "a complete file") from None
        if not pts:
            raise MediaError(url, "video stream has no readable frames: truncated or empty file", "a complete file")
        declared = stream.frames
        if declared and declared > len(pts):
            raise MediaError(url, f"truncated: {len(pts)} frames found, header declares {declared}", "a complete file")
        _check_first_frame_decodes(container, stream, url)
        order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
        pts_ns = ticks_to_ns(np.asarray(pts, dtype=np.int64)[order], Fraction(tb.numerator, tb.denominator))
        keyframe = np.asarray(key, dtype=bool)[order]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else _fps_from_pts(pts_ns)
        return VideoInfo(
            pts_ns=pts_ns,
            keyframe=keyframe,
            fps=fps,
            width=int(stream.codec_context.width),
            height=int(stream.codec_context.height),
            codec=stream.codec_context.name,
        )
    finally:
        container.close()
        if fobj is not None:
            fobj.close()


def _check_first_frame_decodes(container: av.container.InputContainer, stream, url: str) -> None:
    try:
        container.seek(0, stream=stream)
        for frame in container.decode(stream):
            return
    except av.error.FFmpegError as e:
        raise MediaError(url, f"first frame cannot be decoded ({e})", f"decodable {stream.codec_context.name}") from None
    raise MediaError(url, "no frame could be decoded", f"decodable {stream.codec_context.name}")


def _fps_from_pts(pts_ns: np.ndarray) -> float:
    if pts_ns.size < 2:
        return 0.0
    return float(1e9 / np.median(np.diff(pts_ns)))
