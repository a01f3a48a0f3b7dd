"""A recording's video file transcoded into the store being written (``mmloader prepare --video-profile NAME``).

Shared by the recipes that reference existing video files (Ego4D, ``write_store``): the file is re-encoded once with
a ``VideoProfile`` (``mmloader.video.transcode``) into ``media/<recording>/<stream>.<profile>.mp4`` inside the
store, referenced relative to the store root, with each kept frame at its source capture time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

from ..fsutil import is_local, join
from ..store.writer import StoreWriter
from ..video.probe import MediaIdentity, VideoInfo, media_identity
from ..video.transcode import VideoProfile, transcode_video


@dataclass(frozen=True)
class TranscodedVideo:
    """Where the transcoded file is (``uri``: relative to the store root), its probed index (capture times, ns),
    its identity (checked when a reader opens it) and the transcode report."""

    uri: str
    info: VideoInfo
    identity: MediaIdentity
    report: dict[str, Any]


T = TypeVar("T")


def encode_into_store(writer: StoreWriter, rel: str, encode: Callable[[str], T]) -> T:
    """Run ``encode(local_path)`` so that its file ends up at ``rel`` in the store ``writer`` is writing: directly
    there on a local store, else into a temporary local file then copied (the mp4 muxer seeks). Returns its result."""
    work_file = join(writer.work_path, rel)
    if is_local(writer.fs):
        os.makedirs(os.path.dirname(work_file), exist_ok=True)
        return encode(work_file)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(rel))
        out = encode(local)
        writer.fs.makedirs(os.path.dirname(work_file), exist_ok=True)
        with open(local, "rb") as src, writer.fs.open(work_file, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    return out


def transcode_into_store(writer: StoreWriter, src_url: str, recording_id: str, stream: str,
                         profile: VideoProfile, src_options: Mapping[str, Any] | None = None) -> TranscodedVideo:
    """Transcode ``src_url`` with ``profile`` into the store ``writer`` is writing (``encode_into_store``)."""
    rel = f"media/{recording_id}/{stream}.{profile.name}.mp4"
    info, report = encode_into_store(
        writer, rel, lambda path: transcode_video(src_url, path, profile, storage_options=src_options))
    identity = media_identity(join(writer.work_url, rel), dict(writer.storage_options or {}))
    report = {**report, "source": src_url, "uri": rel}
    return TranscodedVideo(uri=rel, info=info, identity=identity, report=report)
