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
from typing import Any, Mapping

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


def transcode_into_store(writer: StoreWriter, src_url: str, recording_id: str, stream: str,
                         profile: VideoProfile, src_options: Mapping[str, Any] | None = None) -> TranscodedVideo:
    """Transcode ``src_url`` with ``profile`` into the store ``writer`` is writing (local or remote: a remote store
    gets a local encode, then a copy, since the mp4 muxer seeks)."""
    rel = f"media/{recording_id}/{stream}.{profile.name}.mp4"
    work_file = join(writer.work_path, rel)
    if is_local(writer.fs):
        os.makedirs(os.path.dirname(work_file), exist_ok=True)
        info, report = transcode_video(src_url, work_file, profile, storage_options=src_options)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, os.path.basename(rel))
            info, report = transcode_video(src_url, local, profile, storage_options=src_options)
            writer.fs.makedirs(os.path.dirname(work_file), exist_ok=True)
            with open(local, "rb") as src, writer.fs.open(work_file, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
    identity = media_identity(join(writer.work_url, rel), dict(writer.storage_options or {}))
    report = {**report, "source": src_url, "uri": rel}
    return TranscodedVideo(uri=rel, info=info, identity=identity, report=report)
