"""Video readers: ``pyav`` (always available, the reference and the default), ``decord`` and
``torchcodec`` (optional). All take frame *indices* in presentation order — the index of a frame in the
store's sorted pts index — so every backend returns the same frame for the same timestamp.

Readers are opened lazily, in the process that uses them (never before a fork), and kept in a bounded
LRU (``ReaderPool``) so worker memory stays flat. Each reader counts what it did (``frames_decoded``, ``seeks``,
``backward_seeks``) so a caller can check how much decoding a read pattern costs.

Decoder threads: every reader opened in a process uses ``decoder_threads()`` threads (``set_decoder_threads``; by
default the CPUs this process may run on). The loader sets it in each worker to CPUs // workers, so that workers ×
threads fits the machine.

``FrameStore``: decoded (already resized) frames kept between reads, bounded in bytes — what a decode plan
(``mmloader.windows.dataset``) serves overlapping windows from.
"""

from __future__ import annotations

import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from fractions import Fraction
from typing import Hashable, Protocol, Sequence

import av
import fsspec
import numpy as np

from ..errors import MediaError
from ..fsutil import get_fs, is_local
from ..lru import LRU
from .probe import MediaIdentity, open_remote, ticks_to_ns, verify_media

Size = tuple[int, int]  # (height, width)


class VideoReader(Protocol):
    """Decodes frames by presentation-order index: ``get_frames(idx) -> (F, H, W, 3) uint8`` in ``idx`` order."""

    backend: str
    url: str

    def get_frames(self, indices: Sequence[int]) -> np.ndarray: ...

    def close(self) -> None: ...


_MODULES = {"pyav": "av", "decord": "decord", "torchcodec": "torchcodec.decoders"}
_PROBE_LOCK = threading.Lock()
_PROBED: dict[str, str | None] = {}  # backend -> None (decodes here) or why it cannot; once per process


_THREADS: int | None = None  # decoder threads per reader in this process; None: every CPU it may use


def cpus_available() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def set_decoder_threads(n: int | None) -> None:
    """Decoder threads of every reader opened from now on in this process (PyAV ``thread_count``, decord
    ``num_threads``, torchcodec ``num_ffmpeg_threads``); ``None``: ``cpus_available()``. Readers already open
    keep theirs. Threads never change the pixels, only the speed."""
    global _THREADS
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"decoder threads must be an integer >= 1 or None, got {n!r}")
    _THREADS = n


def decoder_threads() -> int:
    """The decoder threads a reader opened now in this process uses (see ``set_decoder_threads``)."""
    return _THREADS if _THREADS is not None else cpus_available()


def _have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:  # an installed but broken backend counts as absent
        return False


def _write_probe_sample(path: str) -> None:
    """A tiny real H.264 mp4: 4 frames of 32x32, frame k of brightness 60k (PyAV's bundled FFmpeg)."""
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for k in range(4):
            img = np.full((32, 32, 3), 60 * k, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _decode_probe(backend: str, path: str) -> np.ndarray:
    """Decode frame 2 of the probe file with ``backend``: (H, W, 3) uint8."""
    if backend == "pyav":
        with av.open(path) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        return frames[2]
    if backend == "decord":
        import decord

        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1).get_batch([2]).asnumpy()[0]
    if backend == "torchcodec":
        from torchcodec.decoders import VideoDecoder

        return VideoDecoder(path, seek_mode="exact").get_frames_at(indices=[2]).data[0].permute(1, 2, 0).numpy()
    raise ValueError(backend)


def _why_not(backend: str) -> str | None:
    """None when ``backend`` imports and decodes a real mp4 here, else one line saying why not."""
    module = _MODULES[backend]
    try:
        __import__(module)
    except Exception as e:
        return f"{module} does not import ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
    try:
        with tempfile.TemporaryDirectory(prefix="mmloader-probe-") as tmp:
            path = os.path.join(tmp, "probe.mp4")
            _write_probe_sample(path)
            frame = _decode_probe(backend, path)
    except Exception as e:
        text = str(e)
        if backend == "torchcodec" and ("libtorchcodec" in text or "libav" in text):
            return ("torchcodec cannot load FFmpeg's shared libraries (libavutil, libavcodec, ...; FFmpeg 4 to 9): "
                    "install FFmpeg's libraries (e.g. `apt-get install ffmpeg`, `conda install ffmpeg`)")
        first = text.strip().splitlines()[0][:200] if text.strip() else ""
        return f"{backend} imports but cannot decode a small H.264 mp4 ({type(e).__name__}: {first})"
    if frame.shape != (32, 32, 3) or abs(float(frame.mean()) - 120) > 8:
        return f"{backend} decodes a small H.264 mp4 wrongly (frame of shape {frame.shape}, mean {frame.mean():.1f}, expected 120)"
    return None


def backend_problems(backends: Sequence[str] = ("pyav", "decord", "torchcodec")) -> dict[str, str | None]:
    """For each backend: None when it can decode on this machine, else why not. Probed once per process
    (imports the backend and decodes a 4-frame H.264 mp4), then cached."""
    out = {}
    for b in backends:
        if b not in _MODULES:
            raise ValueError(f"unknown video backend {b!r} (choose auto, pyav, decord or torchcodec)")
        with _PROBE_LOCK:
            if b not in _PROBED:
                _PROBED[b] = _why_not(b)
            out[b] = _PROBED[b]
    return out


def available_backends() -> list[str]:
    """Backends that can decode on this machine (installed *and* able to decode a real mp4: torchcodec
    imports without FFmpeg's shared libraries but cannot decode). Probed once per process, cached;
    ``backend_problems()`` says why a backend is missing."""
    return [b for b, why in backend_problems().items() if why is None]


def resolve_backend(backend: str, url: str | None = None) -> str:
    """``auto`` → pyav: on sparse window access it measured 2-3x faster than decord here
    (``benchmarks/loader.py``). Unknown backends, and backends that cannot decode here, raise saying why."""
    if backend == "auto":
        return "pyav"
    if backend not in _MODULES:
        raise ValueError(f"unknown video backend {backend!r} (choose auto, pyav, decord or torchcodec)")
    why = backend_problems([backend])[backend]  # probes only this backend: cheap in a worker
    if why is not None:
        raise ValueError(f"video backend {backend!r} cannot decode on this machine: {why} "
                         f"(use video_backend='auto' or one of {available_backends()})")
    return backend


def _check_indices(url: str, backend: str, idx: np.ndarray, n: int) -> None:
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:
        raise MediaError(url, f"{backend} could not decode frames {bad.tolist()}: the file has {n} frames")


class PyAVReader:
    """Sparse seeking PyAV decoder: seeks only when the next wanted frame is past a keyframe not yet reached
    (a forward seek, skipping GOPs no wanted frame needs) or behind the last decoded frame (a backward seek).

    Counters: ``frames_decoded`` (every frame out of the decoder, kept or not), ``seeks`` and ``backward_seeks``
    (seeks to a keyframe at or before the last decoded frame)."""

    backend = "pyav"

    def __init__(self, url: str, pts_ns: np.ndarray, keyframe: np.ndarray, size: Size | None = None,
                 storage_options: dict | None = None):
        self.url = url
        self.pts_ns = pts_ns
        self.size = size
        # index of the keyframe at or before each frame
        kf = np.flatnonzero(keyframe)
        self._kf_of = kf[np.clip(np.searchsorted(kf, np.arange(len(pts_ns)), side="right") - 1, 0, len(kf) - 1)] if len(kf) else np.zeros(len(pts_ns), np.int64)
        fs, path = get_fs(url, **(storage_options or {}))
        self._file = None
        try:  # remote media: PyAV reads the fsspec file object
            self._file = None if is_local(fs) else open_remote(fs, path)
            self._container = av.open(path if self._file is None else self._file)
        except (av.error.FFmpegError, OSError) as e:
            if self._file is not None:
                self._file.close()
            raise MediaError(url, f"cannot open with pyav ({e})") from None
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        self._stream.thread_count = decoder_threads()
        tb = self._stream.time_base
        self._tb = Fraction(tb.numerator, tb.denominator)
        self._decoder = None
        self._pos = -1  # index of the last decoded frame, -1 when no decoder is live
        self.frames_decoded = self.seeks = self.backward_seeks = 0

    def _seek(self, index: int) -> None:
        self.seeks += 1
        if self._decoder is not None and self._kf_of[index] <= self._pos:
            self.backward_seeks += 1
        target = self.pts_ns[self._kf_of[index]]
        # the store's pts are ticks rounded to the nearest ns: round back (truncating can land one tick before
        # the keyframe, and a backward seek from there goes to the keyframe before it)
        ticks = round(Fraction(int(target), 1_000_000_000) / self._tb)
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
                self.frames_decoded += 1
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
    """decord's VideoReader; frame indices are decord's presentation-order indices. ``frames_decoded`` counts
    the distinct frames asked for (decord does not say how many it decoded to reach them); ``seeks`` and
    ``backward_seeks`` stay 0 (unknown)."""

    backend = "decord"

    def __init__(self, url: str, pts_ns: np.ndarray, keyframe: np.ndarray, size: Size | None = None,
                 storage_options: dict | None = None):
        import decord

        self.url = url
        fs, path = get_fs(url, **(storage_options or {}))
        if not is_local(fs):
            raise MediaError(url, "decord reads local files only; use backend='pyav' for remote media")
        kw = {} if size is None else {"height": size[0], "width": size[1]}
        try:
            self._vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=decoder_threads(), **kw)
        except Exception as e:  # decord raises its own DECORDError
            raise MediaError(url, f"cannot open with decord ({e})") from None
        if len(self._vr) != len(pts_ns):
            raise MediaError(url, f"decord sees {len(self._vr)} frames, the store's index has {len(pts_ns)}")
        self.frames_decoded = self.seeks = self.backward_seeks = 0

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        idx = [int(i) for i in indices]
        _check_indices(self.url, self.backend, np.asarray(idx), len(self._vr))
        self.frames_decoded += len(set(idx))
        try:
            return self._vr.get_batch(idx).asnumpy()
        except Exception as e:  # DECORDError and friends
            raise MediaError(self.url, f"decord could not decode frames {idx}: {e}") from None

    def close(self) -> None:
        del self._vr


def _torchcodec_resize(size: Size | None) -> list | None:
    """``[torchcodec.transforms.Resize(size)]`` when ``size`` is set and this torchcodec has decoder transforms."""
    if size is None:
        return None
    try:
        from torchcodec.transforms import Resize
    except ImportError:
        return None
    return [Resize(size=(int(size[0]), int(size[1])))]


class TorchCodecReader:
    """torchcodec's VideoDecoder (exact seek mode). With ``size``, frames are resized inside the decoder (torchcodec's
    ``Resize`` decoder transform: bilinear with anti-aliasing, in FFmpeg, before the colour conversion of a full
    frame); a torchcodec without decoder transforms resizes the decoded frames with torch instead.
    ``frames_decoded`` counts the distinct frames asked for; ``seeks`` and ``backward_seeks`` stay 0 (unknown)."""

    backend = "torchcodec"

    def __init__(self, url: str, pts_ns: np.ndarray, keyframe: np.ndarray, size: Size | None = None,
                 storage_options: dict | None = None):
        from torchcodec.decoders import VideoDecoder

        self.url = url
        self.size = size
        fs, path = get_fs(url, **(storage_options or {}))
        self._file = None if is_local(fs) else open_remote(fs, path)  # torchcodec reads file-like objects
        transforms = _torchcodec_resize(size)
        self._resize_after = size is not None and transforms is None
        try:
            self._dec = VideoDecoder(path if self._file is None else self._file, seek_mode="exact",
                                     num_ffmpeg_threads=decoder_threads(),
                                     **({} if transforms is None else {"transforms": transforms}))
        except Exception as e:  # torchcodec raises RuntimeError / ValueError of its own
            if self._file is not None:
                self._file.close()
            raise MediaError(url, f"cannot open with torchcodec ({e})") from None
        self.frames_decoded = self.seeks = self.backward_seeks = 0

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        import torch

        idx = [int(i) for i in indices]
        _check_indices(self.url, self.backend, np.asarray(idx), self._dec.metadata.num_frames)
        self.frames_decoded += len(set(idx))
        data = self._dec.get_frames_at(indices=idx).data  # (F, 3, H, W) uint8
        if self._resize_after:
            data = torch.nn.functional.interpolate(data.float(), size=self.size, mode="bilinear", antialias=True)
            data = data.round().clamp(0, 255).to(torch.uint8)
        return data.permute(0, 2, 3, 1).numpy()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


_READERS = {"pyav": PyAVReader, "decord": DecordReader, "torchcodec": TorchCodecReader}


def _is_local_url(url: str) -> bool:
    return fsspec.utils.get_protocol(url) in ("file", "local")


_WARNED_REMOTE: set[str] = set()


def reader_backend(backend: str, url: str) -> str:
    """The backend ``open_reader`` uses for ``url``: ``resolve_backend``'s choice, except that decord reads
    local files only, so a remote URL (``s3://``...) is decoded by PyAV instead (warned once per backend and
    process; the reader's ``backend`` attribute says which one decodes). PyAV and torchcodec read remote
    media through an fsspec file object."""
    name = resolve_backend(backend, url)
    if name == "decord" and not _is_local_url(url):
        if name not in _WARNED_REMOTE:
            _WARNED_REMOTE.add(name)
            warnings.warn(f"decord reads local files only: {url} and other remote media are decoded with pyav",
                          stacklevel=3)
        return "pyav"
    return name


def open_reader(backend: str, url: str, pts_ns: np.ndarray, keyframe: np.ndarray, size: Size | None = None, *,
                storage_options: dict | None = None, identity: MediaIdentity | None = None,
                recording_id: str | None = None, stream: str = "video") -> VideoReader:
    """Open one reader of ``backend`` (``auto`` resolved per URL, see ``reader_backend``).

    ``storage_options``: the fsspec options of ``url`` (e.g. an S3 endpoint). ``identity``: what the file
    was at prepare (``MediaIdentity``); checked before the file is opened (``mmloader.video.probe.verify_media``:
    a replaced file raises MediaError naming it, ``recording_id`` and ``stream``).
    """
    if identity is not None:
        verify_media(url, identity, recording_id=recording_id, stream=stream, storage_options=storage_options)
    return _READERS[reader_backend(backend, url)](url, pts_ns, keyframe, size, storage_options)


def _local_stamp(url: str) -> tuple[str, tuple[int, int, int]] | None:
    """(path, (size, mtime_ns, inode)) of a local file; None for remote URLs."""
    if not _is_local_url(url):
        return None
    path = get_fs(url)[1]
    try:
        st = os.stat(path)
    except OSError:
        return path, (-1, -1, -1)
    return path, (st.st_size, st.st_mtime_ns, st.st_ino)


class ReaderPool:
    """A bounded LRU of open readers, private to the process that created it (safe across fork).

    Readers opened with an ``identity`` are checked once per open (``open_reader``). A local file is also
    re-stat'ed (a few microseconds) each time its open reader is reused: if it changed since the open
    (replaced, rewritten, touched), the reader is reopened, which checks the identity again. Remote files
    are checked once per reader open only (a stat there is a network request).
    """

    def __init__(self, backend: str = "auto", capacity: int = 4):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.backend = backend
        self.capacity = capacity
        self._pid = os.getpid()
        self._readers: LRU[VideoReader] = LRU(capacity, on_evict=self._evicted)
        self._stamps: dict[tuple[str, Size | None], tuple[str, tuple[int, int, int]] | None] = {}

    def _evicted(self, key: Hashable, reader: VideoReader) -> None:
        """The least recently used reader, pushed out past ``capacity``: forgotten and closed."""
        self._stamps.pop(key, None)
        reader.close()

    def _changed(self, key: tuple[str, Size | None]) -> bool:
        stamp = self._stamps.get(key)
        if stamp is None:
            return False
        path, seen = stamp
        try:
            st = os.stat(path)
        except OSError:
            return True
        return (st.st_size, st.st_mtime_ns, st.st_ino) != seen

    def get(self, url: str, pts_ns: np.ndarray, keyframe: np.ndarray, size: Size | None = None, *,
            storage_options: dict | None = None, identity: MediaIdentity | None = None,
            recording_id: str | None = None, stream: str = "video") -> VideoReader:
        """The open reader of ``url`` at ``size`` (most recently used now), opened when absent or changed."""
        if os.getpid() != self._pid:  # inherited through fork: never share decoders across processes
            self._readers = LRU(self.capacity, on_evict=self._evicted)
            self._stamps = {}
            self._pid = os.getpid()
        key = (url, size)
        if key in self._readers and self._changed(key):
            self._readers.pop(key).close()

        def load() -> VideoReader:
            self._stamps.pop(key, None)
            reader = open_reader(self.backend, url, pts_ns, keyframe, size, storage_options=storage_options,
                                 identity=identity, recording_id=recording_id, stream=stream)
            if identity is not None:
                self._stamps[key] = _local_stamp(url)
            return reader

        return self._readers.get(key, load)

    def __len__(self) -> int:
        return len(self._readers)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()
        self._stamps.clear()


class FrameStore:
    """Decoded frames kept between reads, keyed by ``(media, frame index)`` (``media``: ``(url, size)``), at
    most ``max_bytes`` of frame data in all: inserting past the bound drops the oldest frames first (a frame
    larger than the bound is not kept). Private to the process that uses it; ``peak_bytes`` is the most it held."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._frames: OrderedDict[tuple[Hashable, int], np.ndarray] = OrderedDict()
        self.nbytes = 0
        self.peak_bytes = 0

    def get(self, media: Hashable, index: int) -> np.ndarray | None:
        return self._frames.get((media, int(index)))

    def put(self, media: Hashable, index: int, frame: np.ndarray) -> None:
        key = (media, int(index))
        old = self._frames.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self._frames[key] = frame
        self.nbytes += frame.nbytes
        while self.nbytes > self.max_bytes and self._frames:
            self.nbytes -= self._frames.popitem(last=False)[1].nbytes
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def drop(self, media: Hashable, below: int | None = None) -> None:
        """Forget ``media``'s frames (those with an index below ``below`` only, when given)."""
        for key in [k for k in self._frames if k[0] == media and (below is None or k[1] < below)]:
            self.nbytes -= self._frames.pop(key).nbytes

    def clear(self) -> None:
        self._frames.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._frames)
