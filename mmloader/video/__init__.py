"""Video decoding behind one small interface, and frame selection by timestamp."""

from .backends import ReaderPool, VideoReader, available_backends, open_reader, resolve_backend
from .select import nearest_frames

__all__ = ["ReaderPool", "VideoReader", "available_backends", "nearest_frames", "open_reader", "resolve_backend"]
