"""Video readers: ``pyav`` (always available, the reference and the default), ``decord`` and
``torchcodec`` (optional). All take frame *indices* in presentation order — the index of a frame in the
store's sorted pts index — so every backend returns the same frame for the same timestamp.

Readers are opened lazily, in the process that uses them (never before a fork), and kept in a bounded
LRU (``ReaderPool``) so worker memory stays flat.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from fractions import Fraction
from typing import Protocol, Sequence

import av
import numpy as np

from ..errors import MediaError
from ..fsutil import get_fs, is_local
from ..media import ticks_to_ns

Size = tuple[int, int]  # (height, width)


class VideoReader(Protocol):
    """Decodes frames by presentation-order index: ``get_frames(idx) -> (F, H, W, 3) uint8`` in ``idx`` order."""

    backend: str
    url: str

    def get_frames(self, indices: Sequence[int]) -> np.ndarray: ...

    def close(self) -> None: ...


def _have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:  # an installed but broken backend counts as absent
        return False


def available_backends() -> list[str]:
    """Backends importable here."""
    return [b for b, m in (("pyav", "av"), ("decord", "decord"), ("torchcodec", "torchcodec.decoders")) if _have(m)]


def resolve_backend(backend: str, url: str | None = None) -> str:
    """``auto`` → pyav: on sparse window access it measured 2-3x faster than decord here
    (``benchmarks/loader.py``). Unknown or missing backends raise."""
    if backend == "auto":
        return "pyav"
    if backend not in ("pyav", "decord", "torchcodec"):
        raise ValueError(f"unknown video backend {backend!r} (choose auto, pyav, decord or torchcodec)")
    if backend not in available_backends():
        raise ValueError(f"video backend {backend!r} is not installed here (available: {available_backends()})")
    return backend


def _check_indices(url: str, backend: str, idx: np.ndarray, n: int) -> None:
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:
        raise MediaError(url, f"{backend} could not decode frames {bad.tolist()}: the file has {n} frames")


class PyAVReader:
    """Sparse seeking PyAV decoder: seeks only when the next wanted frame is past a keyframe not yet reached."""

    backend = "pyav"

    def __init__(self, url: str, pts_ns: np.ndarray, keyframe: np.ndarray, size: Size | None = None):
        self.url = url
        self.pts_ns = pts_ns
        self.size = size
        # index of the keyframe at or before each frame
        kf = np.flatnonzero(keyframe)
        self._kf_of = kf[np.clip(np.searchsorted(kf, np.arange(len(pts_ns)), side="right") - 1, 0, len(kf) - 1)] if len(kf) else np.zeros(len(pts_ns), np.int64)
        fs, path = get_fs(url)
        self._file = None if is_local(fs) else fs.open(path, "rb")
        try:
            self._container = av.open(path if self._file is None else self._file)
        except (av.error.FFmpegError, OSError) as e:
            raise MediaError(url, f"cannot open with pyav ({e})") from None
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        tb = self._stream.time_base
        self._tb = Fraction(tb.numerator, tb.denominator)
        self._decoder = None
        self._pos = -1  # index of the last decoded frame, -1 when no decoder is live

    def _seek(self, index: int) -> None:
        target = self.pts_ns[self._kf_of[index]]
        ticks = int(Fraction(int(target), 1_000_000_000) / self._tb)
        self._container.seek(ticks, stream=self._stream, backward=True, any_frame=False)
        self._decoder = self._container.decode(self._stream)
        self._pos = -1

    def _frame_index(self, frame: av.VideoFrame) -> int:
        if frame.pts is None:
            return self._pos + 1
        t = int(ticks_to_ns(np.array([frame.pts]), self._tb)[0])
        i = int(np.searchsorted(self.pts_ns, t - 1000))
        return min(i, len(self.pts_ns) - 1)

    def _to_array(self, frame: av.VideoFrame) -> np.ndarray:
        if self.size is None:
            return frame.to_ndarray(format="rgb24")
        h, w = self.size
        return frame.to_ndarray(format="rgb24", width=w, height=h)

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        _check_indices(self.url, self.backend, idx, len(self.pts_ns))
        out: dict[int, np.ndarray] = {}
        for target in np.unique(idx):
            if self._decoder is None or target <= self._pos or self._kf_of[target] > self._pos:
                self._seek(int(target))
            while True:
                try:
                    frame = next(self._decoder)
                except (StopIteration, av.error.FFmpegError) as e:
                    self._decoder = None
                    raise MediaError(self.url, f"pyav could not decode frame {target} (pts {self.pts_ns[target]} ns): "
                                     f"{'end of stream' if isinstance(e, StopIteration) else e}") from None
                self._pos = self._frame_index(frame)
                if self._pos >= target:
                    out[int(target)] = self._to_array(frame)
                    break
        return np.stack([out[int(i)] for i in idx])

    def close(self) -> None:
        self._container.close()
        if self._file is not None:
            self._file.close()


class DecordReader:
    """decord's VideoReader; frame indices are decord's presentation-order indices."""

    backend = "decord"

    def __init__(self, url: str, pts_ns: np.ndarray, keyframe: np.ndarray, size: Size | None = None):
        import decord

        self.url = url
        fs, path = get_fs(url)
        if not is_local(fs):
            raise MediaError(url, "decord reads local files only; use backend='pyav' for remote media")
        kw = {} if size is None else {"height": size[0], "width": size[1]}
        try:
            self._vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1, **kw)
        except Exception as e:  # decord raises its own DECORDError
            raise MediaError(url, f"cannot open with decord ({e})") from None
        if len(self._vr) != len(pts_ns):
            raise MediaError(url, f"decord sees {len(self._vr)} frames, the store's index has {len(pts_ns)}")

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        idx = [int(i) for i in indices]
        _check_indices(self.url, self.backend, np.asarray(idx), len(self._vr))
        try:
            return self._vr.get_batch(idx).asnumpy()
        except Exception as e:  # DECORDError and friends
            raise MediaError(self.url, f"decord could not decode frames {idx}: {e}") from None

    def close(self) -> None:
        del self._vr


class TorchCodecReader:
    """torchcodec's VideoDecoder (exact seek mode); resized after decoding when ``size`` is set."""

    backend = "torchcodec"

    def __init__(self, url: str, pts_ns: np.ndarray, keyframe: np.ndarray, size: Size | None = None):
        from torchcodec.decoders import VideoDecoder

        self.url = url
        self.size = size
        fs, path = get_fs(url)
        self._file = None if is_local(fs) else fs.open(path, "rb")
        self._dec = VideoDecoder(path if self._file is None else self._file, seek_mode="exact")

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        import torch

        idx = [int(i) for i in indices]
        _check_indices(self.url, self.backend, np.asarray(idx), self._dec.metadata.num_frames)
        data = self._dec.get_frames_at(indices=idx).data  # (F, 3, H, W) uint8
        if self.size is not None:
            data = torch.nn.functional.interpolate(data.float(), size=self.size, mode="bilinear", antialias=True)
            data = data.round().clamp(0, 255).to(torch.uint8)
        return data.permute(0, 2, 3, 1).numpy()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


_READERS = {"pyav": PyAVReader, "decord": DecordReader, "torchcodec": TorchCodecReader}


def open_reader(backend: str, url: str, pts_ns: np.ndarray, keyframe: np.ndarray, size: Size | None = None) -> VideoReader:
    """Open one reader of ``backend`` (``auto`` resolved per URL)."""
    return _READERS[resolve_backend(backend, url)](url, pts_ns, keyframe, size)


class ReaderPool:
    """A bounded LRU of open readers, private to the process that created it (safe across fork)."""

    def __init__(self, backend: str = "auto", capacity: int = 4):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.backend = backend
        self.capacity = capacity
        self._pid = os.getpid()
        self._readers: OrderedDict[tuple[str, Size | None], VideoReader] = OrderedDict()

    def get(self, url: str, pts_ns: np.ndarray, keyframe: np.ndarray, size: Size | None = None) -> VideoReader:
        if os.getpid() != self._pid:  # inherited through fork: never share decoders across processes
            self._readers = OrderedDict()
            self._pid = os.getpid()
        key = (url, size)
        reader = self._readers.get(key)
        if reader is None:
            reader = open_reader(self.backend, url, pts_ns, keyframe, size)
            self._readers[key] = reader
            while len(self._readers) > self.capacity:
                _, old = self._readers.popitem(last=False)
                old.close()
        else:
            self._readers.move_to_end(key)
        return reader

    def __len__(self) -> int:
        return len(self._readers)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()
