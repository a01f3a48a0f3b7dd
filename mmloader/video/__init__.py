"""Video decoding behind one small interface, frame selection by timestamp, and transcode profiles."""

from .backends import ReaderPool, VideoReader, available_backends, open_reader, resolve_backend
from .select import nearest_frames
from .transcode import VIDEO_PROFILES, VideoProfile, transcode_video

__all__ = ["ReaderPool", "VIDEO_PROFILES", "VideoProfile", "VideoReader", "available_backends", "nearest_frames",
           "open_reader", "resolve_backend", "transcode_video"]
