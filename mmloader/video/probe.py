"""Media files: probing with PyAV (per-frame presentation timestamps, size, codec), their identity
(size, mtime, fast content hash) recorded at prepare and checked when a reader opens them, and where a
store's ``uri`` points.

Times are int64 nanoseconds of the stream's presentation clock (pts × time_base), never shifted to
start at zero.

Where media live (the ``uri`` column of ``streams`` for ``kind == "video"``):

- a *relative* path (no ``scheme://``, not starting with ``/``), e.g. ``media/rec/camera-rgb.mp4``: a file
  inside the store, resolved against the store's URL when read (``media_url``). A store moved, copied or
  uploaded elsewhere reads its own copy; the store's ``storage_options`` apply to it.
- an absolute path or URL: a file outside the store (Ego4D's source mp4s unless ``copy_media=True``). The
  store's ``storage_options`` apply to it only when it uses the store's protocol (``media_storage_options``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from typing import Any, Mapping

import av
import fsspec
import numpy as np

from ..errors import MediaError
from ..fsutil import get_fs, is_local, join

HASH_SPAN = 1 << 20  # bytes hashed at each end of a media file
MOOV_MAX = 64 << 20  # a moov box up to this size is hashed too (it indexes every frame)
REMOTE_BLOCK_SIZE = 4 << 20  # read-ahead of remote media files (s3fs defaults to 50 MiB per request)
HASH_SCHEME = "headtail-sha256"


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


def probe_video(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> VideoInfo:
    """Demux every packet of the first video stream (no decoding but one frame) and return its index.

    ``storage_options`` configure the file's fsspec filesystem (e.g. an S3 endpoint); remote files are
    read through a Python file object (PyAV reads any seekable file object).

    Raises MediaError naming the file when it cannot be opened, has no video stream, is truncated
    (a packet lies beyond the end of the file) or its first frame cannot be decoded.
    """
    url = os.fspath(url)
    fs, path = get_fs(url, **(storage_options or {}))
    try:
        file_size = fs.size(path)
    except FileNotFoundError:
        raise MediaError(url, "file not found", "an mp4 video file") from None
    container, fobj = open_container(fs, path, url, "a playable mp4 with a video stream")
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


# -- where a store's media are ------------------------------------------------------------------------
def is_store_relative(uri: str) -> bool:
    """True for a ``uri`` that names a file inside the store (no scheme, not an absolute path)."""
    return "://" not in uri and not os.path.isabs(uri)


def media_url(store_url: str, uri: str) -> str:
    """The URL a ``streams.uri`` of a store at ``store_url`` points to (relative uris: inside the store)."""
    return join(store_url, uri) if is_store_relative(uri) else uri


def _protocol(url: str) -> str:
    p = fsspec.utils.get_protocol(url)
    return "file" if p in ("file", "local") else p


def media_storage_options(store_url: str, url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The store's ``storage_options`` when ``url`` is on the store's protocol (its own media, or external
    media on the same object store), else none: an S3 endpoint's keys are never handed to a local file."""
    if storage_options and _protocol(url) == _protocol(store_url):
        return dict(storage_options)
    return {}


def open_container(fs: fsspec.AbstractFileSystem, path: str, url: str, expected: str) -> tuple[Any, Any]:
    """(PyAV input container, the file object it reads or None) of the media file at ``path`` on ``fs``: local files
    by path, remote ones through ``open_remote``. MediaError naming ``url`` (``expected``: what it should be) when
    it cannot be opened as media."""
    fobj = None
    try:
        if is_local(fs):
            return av.open(path, mode="r"), None
        fobj = open_remote(fs, path)
        return av.open(fobj, mode="r"), fobj
    except (av.error.FFmpegError, OSError, ValueError) as e:
        if fobj is not None:
            fobj.close()
        raise MediaError(url, f"cannot open as media ({e})", expected) from None


def open_remote(fs: fsspec.AbstractFileSystem, path: str):
    """A binary file object of a remote media file with a read-ahead sized for seeking decoders."""
    try:
        return fs.open(path, "rb", block_size=REMOTE_BLOCK_SIZE)
    except TypeError:  # a filesystem without block_size
        return fs.open(path, "rb")


def copy_media(src_url: str, dst_url: str, src_options: Mapping[str, Any] | None = None,
               dst_options: Mapping[str, Any] | None = None) -> None:
    """Copy one media file between any two fsspec URLs (streamed; never whole in memory)."""
    sfs, spath = get_fs(src_url, **(src_options or {}))
    dfs, dpath = get_fs(dst_url, **(dst_options or {}))
    try:
        if is_local(sfs) and is_local(dfs):
            os.makedirs(os.path.dirname(dpath), exist_ok=True)
            shutil.copyfile(spath, dpath)
            return
        dfs.makedirs(os.path.dirname(dpath), exist_ok=True)
        with sfs.open(spath, "rb") as src, dfs.open(dpath, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
    except FileNotFoundError:
        raise MediaError(src_url, "file not found while copying it into the store", "a readable media file") from None


# -- identity -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MediaIdentity:
    """What a media file was at prepare: ``size`` (bytes), ``mtime_ns`` (None where the filesystem has no
    modification time) and ``hash`` (``fast_hash``). Stored in ``streams`` as media_size, media_mtime_ns,
    media_hash."""

    size: int
    mtime_ns: int | None
    hash: str

    def columns(self) -> dict[str, Any]:
        """The ``streams`` columns of this identity."""
        return {"media_size": self.size, "media_mtime_ns": self.mtime_ns, "media_hash": self.hash}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "MediaIdentity | None":
        """The identity recorded in a ``streams`` row, or None when it has none (written without it)."""
        if row.get("media_size") is None or not row.get("media_hash"):
            return None
        return cls(int(row["media_size"]), row.get("media_mtime_ns"), str(row["media_hash"]))


def _mtime_ns(fs: fsspec.AbstractFileSystem, path: str, info: Mapping[str, Any]) -> int | None:
    """Modification time in ns from a local stat or an fsspec ``info`` dict (S3 ``LastModified``...)."""
    if is_local(fs):
        return os.stat(path).st_mtime_ns
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(key)
        if v is None:
            continue
        if isinstance(v, str):
            try:
                v = datetime.fromisoformat(v.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(v, datetime):
            return round(v.timestamp() * 1e6) * 1000
        if isinstance(v, (int, float)):
            return round(float(v) * 1e6) * 1000
    return None


def _stat(fs: fsspec.AbstractFileSystem, path: str, url: str) -> tuple[int, int | None]:
    try:
        if is_local(fs):
            st = os.stat(path)
            return int(st.st_size), int(st.st_mtime_ns)
        info = fs.info(path)
    except FileNotFoundError:
        raise MediaError(url, "file not found", "the media file recorded at prepare") from None
    return int(info["size"]), _mtime_ns(fs, path, info)


def _moov_span(fs: fsspec.AbstractFileSystem, path: str, size: int, head: bytes) -> tuple[int, int] | None:
    """(start, end) of the top-level ``moov`` box of an ISO-BMFF (mp4/mov) file, or None."""
    off = 0
    for _ in range(64):  # mp4s have a handful of top-level boxes (ftyp, free, mdat, moov...)
        if off + 8 > size:
            return None
        hdr = head[off:off + 16] if off + 16 <= len(head) else fs.cat_file(path, start=off, end=min(off + 16, size))
        if len(hdr) < 8:
            return None
        n = int.from_bytes(hdr[:4], "big")
        kind = hdr[4:8]
        if n == 1:  # 64-bit size follows
            if len(hdr) < 16:
                return None
            n = int.from_bytes(hdr[8:16], "big")
        elif n == 0:  # box extends to the end of the file
            n = size - off
        if n < 8 or not all(32 <= c < 127 for c in kind):
            return None  # not an ISO-BMFF file (mkv, webm...): head and tail only
        if kind == b"moov":
            return off, min(off + n, size)
        off += n
    return None


def fast_hash(url: str, storage_options: Mapping[str, Any] | None = None, *, _fs=None, _path=None,
              _size: int | None = None) -> str:
    """``headtail-sha256:<hex>``: SHA-256 of the file size, its first and last MiB and, for mp4/mov files,
    its ``moov`` box (when not already inside those two MiB; up to 64 MiB). Reads at most ~2 MiB plus the
    moov box, with a few range requests on object stores, whatever the file's size.

    Why this is enough to catch a *replaced* file (another video at the same path): an encoded video's
    first MiB holds its container header and its first compressed frames, its last MiB its last frames or
    its index, and the moov box lists the size, offset and timestamp of every frame. Two different
    encodes agree on all of these, at the same byte size, only by design, never by accident. The hash is
    not a defence against a deliberate edit in the middle of the media data (that would need hashing the
    whole file, which costs a full read per check); it identifies files, it does not authenticate them.
    """
    fs, path = (_fs, _path) if _fs is not None else get_fs(url, **(storage_options or {}))
    size = _size if _size is not None else _stat(fs, path, url)[0]
    h = hashlib.sha256(f"{HASH_SCHEME} size={size}\n".encode())
    try:
        if size <= 2 * HASH_SPAN:
            head = fs.cat_file(path)
            h.update(head)
            tail = b""
        else:
            head = fs.cat_file(path, start=0, end=HASH_SPAN)
            tail = fs.cat_file(path, start=size - HASH_SPAN, end=size)
            h.update(head)
            h.update(tail)
            span = _moov_span(fs, path, size, head)
            if span is not None:
                a, b = span
                inside = b <= len(head) or a >= size - len(tail)
                if not inside and b - a <= MOOV_MAX:
                    h.update(b"moov")
                    h.update(fs.cat_file(path, start=a, end=b))
    except FileNotFoundError:
        raise MediaError(url, "file not found", "the media file recorded at prepare") from None
    return f"{HASH_SCHEME}:{h.hexdigest()}"


def media_identity(url: str, storage_options: Mapping[str, Any] | None = None) -> MediaIdentity:
    """Size, mtime (ns) and fast content hash of a media file, as recorded at prepare."""
    fs, path = get_fs(url, **(storage_options or {}))
    size, mtime = _stat(fs, path, url)
    return MediaIdentity(size, mtime, fast_hash(url, _fs=fs, _path=path, _size=size))


# (url, size, mtime_ns) → hash: files already hashed in this process (a copied store has new mtimes on
# every file; each is hashed once per process, not at every reader open). Plain dict get/set: atomic
# under the GIL, and no lock that a fork could inherit held.
_HASHED: dict[tuple[str, int, int | None], str] = {}


def verify_media(url: str, expected: MediaIdentity, *, recording_id: str | None = None, stream: str = "video",
                 storage_options: Mapping[str, Any] | None = None, deep: bool = False) -> tuple[int, int | None]:
    """Check that the file at ``url`` is the one prepared; returns its (size, mtime_ns).

    How the three fields are used:

    - **size** differs → MediaError (another file, or a truncated one).
    - **mtime** equal to the one recorded → accepted without reading (a stat only).
    - **mtime** differs (or unknown) → the fast hash is computed: a copy (``cp``, ``shutil.copytree``
      without metadata, an S3 upload) has a new mtime and the same content, and is accepted; a different
      hash → MediaError. An mtime change alone is never an error. Each (file, size, mtime) is hashed at
      most once per process.
    - ``deep=True`` (``mmloader validate``) always hashes, trusting neither the mtime nor the per-process
      memo: a replacement padded to the same size with its mtime set back (``os.utime``) passes the cheap
      check a reader makes at every open, but not this one.

    The error names the file, the recording and stream, and what differs.
    """
    fs, path = get_fs(url, **(storage_options or {}))
    who = f"recording {recording_id!r} stream {stream!r}" if recording_id is not None else f"stream {stream!r}"
    try:
        size, mtime = _stat(fs, path, url)
    except MediaError:
        raise MediaError(url, f"media file of {who} not found (moved or deleted since prepare?)",
                         "the file recorded at prepare; prepare the store again") from None
    if size != expected.size:
        raise MediaError(url, f"media file of {who} is not the one prepared: size {size} bytes, recorded "
                         f"{expected.size} bytes at prepare (replaced or truncated)",
                         "the same file; prepare the store again") from None
    if not deep and expected.mtime_ns is not None and mtime == expected.mtime_ns:
        return size, mtime
    key = (url, size, mtime)
    found = None if deep else _HASHED.get(key)
    if found is None:
        found = fast_hash(url, _fs=fs, _path=path, _size=size)
        _HASHED[key] = found
    if found != expected.hash:
        raise MediaError(url, f"media file of {who} is not the one prepared: content hash {found} differs from "
                         f"{expected.hash} recorded at prepare (same size {size} bytes, mtime "
                         f"{mtime} ns vs {expected.mtime_ns} ns): another file sits at this path",
                         "the same file; prepare the store again")
    return size, mtime


def check_store_media(store: Any) -> list[str]:
    """Every video row's media file of an open ``Store`` checked against its recorded identity
    (``verify_media(deep=True)``: always hashed); returns the problems (empty when all are intact). For ``Store.validate``-style
    reports: rows without an identity are skipped."""
    problems = []
    for row in store.streams.to_pylist():
        if row["kind"] != "video":
            continue
        ident = MediaIdentity.from_row(row)
        if ident is None:
            continue
        url = media_url(store.url, row["uri"])
        try:
            verify_media(url, ident, recording_id=row["recording_id"], stream=row["stream"], deep=True,
                         storage_options=media_storage_options(store.url, url, store.storage_options))
        except MediaError as e:
            problems.append(str(e))
    return problems
