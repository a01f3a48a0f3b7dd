"""``WindowSet``: a map-style dataset of aligned windows.

A sample is a flat dict (one window, times in seconds relative to ``t0`` unless named ``*_ns``):

==================  ==========================  ==============================================================
key                 type                        meaning
==================  ==========================  ==============================================================
``<ts>``            float32 tensor (C, T)       a time series (e.g. ``imu``) on the grid ``t0 + k / imu_hz``
``<ts>_mask``       bool tensor (T,)            False where the grid point is in a gap (value 0 there)
``<video>``         uint8 tensor (F, 3, H, W)   the frames nearest to the requested times
``<video>_t``       float32 tensor (F,)         the frames' actual pts − t0, seconds
``text``            str or list[str]            the narration (events mode) / narrations inside (tile mode)
``label``           str                         with ``label_stream``: the segment label covering most of it
``recording_id``    str
``t0``, ``t1``      float                       window bounds, seconds on the recording clock
``index``           int                         position in this WindowSet
==================  ==========================  ==============================================================

Decode plans: when windows are read in index order — the previous read in this process was window ``i - 1``,
or ``will_read(indices)`` announced an ascending run that contains ``i`` — the video of window ``i`` is decoded
together with every frame that later windows of the run in the same recording need up to window ``i``'s last
frame, in one forward call to the reader; those frames wait in a bounded per-process ``FrameStore`` (keyed by
media URL, size and frame index; ``frame_store_mb``, default 128 MiB per process) until their window is read, and
frames below the next window's first frame are dropped. The reader thus moves forward through a recording (it
seeks forward only past GOPs no window needs) and decodes each needed frame once. Any other access reads each
window alone, as before, and empties the store. Plans change how frames are decoded, never which frames or their
pixels (``decode_plans = False`` turns them off).
"""

from __future__ import annotations

import os
import threading
import zlib
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..lru import LRU
from .collate import collate, collate_values
from .resample import DOWNSAMPLE_RATIO, filter_support_ns, resample
from ..store import Store
from ..video.probe import MediaIdentity, media_storage_options, media_url
from ..video.backends import FrameStore, ReaderPool, VideoReader, reader_backend
from .index import build_index
from .protocol import canonical_spec, index_digest, position, sha256_json
from .spec import NS, Modalities, WindowSpec, check_split, resolve_modalities

if TYPE_CHECKING:
    from ..cache import CachedWindows

VIDEO_INDEX_CACHE = 32
PLAN_SCAN = 512  # the most later windows a decode plan looks at
GROUP_MIN = 4  # windows of one recording in a batch from which they are read together (Store.regular_runs)


def grid_and_step(spec: WindowSpec) -> tuple[np.ndarray, int]:
    """The IMU grid offsets of ``spec`` (ns from t0) and their step when every offset is exactly ``k * step``
    (e.g. 200 Hz: 5 ms), else 0 (e.g. 30 Hz, whose offsets are rounded)."""
    offsets = spec.grid_offsets_ns()
    if len(offsets) < 2:
        return offsets, 0
    step = int(offsets[1] - offsets[0])
    exact = step > 0 and np.array_equal(offsets, np.arange(len(offsets), dtype=np.int64) * step)
    return offsets, step if exact else 0


def _clusters(t0s: np.ndarray, gap_ns: int) -> list[list[int]]:
    """Positions in ``t0s``, split where sorted neighbours are more than ``gap_ns`` apart (windows of one recording
    that a shared span of samples serves: it is never much longer than the windows themselves)."""
    order = np.argsort(t0s, kind="stable")
    cuts = np.flatnonzero(np.diff(t0s[order]) > gap_ns) + 1
    return [part.tolist() for part in np.split(order, cuts)]


class _Plan:
    """One process's decode-plan state for one WindowSet: the last window read, the announced run (ascending
    window indices, or None) and where reading is in it, and the frame store."""

    def __init__(self, max_bytes: int):
        self.pid = os.getpid()
        self.last: int | None = None
        self.run: np.ndarray | None = None
        self.ptr = 0
        self.store = FrameStore(max_bytes)
        self.frame_bytes: dict[tuple, int] = {}  # media -> bytes of one decoded frame

    def announce(self, indices: Sequence[int] | np.ndarray | None) -> None:
        run = None if indices is None else np.asarray(indices, dtype=np.int64).ravel()
        if run is not None and (run.size == 0 or np.any(np.diff(run) <= 0)):
            run = None  # only ascending runs can be decoded forward
        self.run, self.ptr = run, 0
        if run is None:
            self.store.clear()

    def ahead(self, i: int, n: int) -> np.ndarray | None:
        """The windows to be read after ``i`` (up to ``PLAN_SCAN``), or None when reads are not sequential."""
        out = None
        if self.run is not None:
            run, p = self.run, self.ptr
            if not (p < len(run) and run[p] == i):
                p = int(np.searchsorted(run, i))
            if p < len(run) and run[p] == i:
                self.ptr = p + 1
                out = run[p + 1: p + 1 + PLAN_SCAN]
            else:
                self.run = None
        if out is None and self.last is not None and i == self.last + 1:
            out = np.arange(i + 1, min(n, i + 1 + PLAN_SCAN))
        self.last = i
        if out is None:
            self.store.clear()
        return out


class WindowSet:
    """Windows of one dataset, built once (``Dataset.windows(...)``); ``len``, ``[i]``, ``split``, ``filter``.

    Picklable and cheap to send to workers: it carries the index columns (numpy, ~11 B per IMU-only window: see
    ``_Columns``) and the store URL; the store, video readers and caches are opened lazily in the process that
    reads. ``index`` is the window index as an Arrow table (built from the columns when first asked in a set
    that was derived or unpickled). Sets derived by ``split``, ``recordings`` and ``filter`` share this set's
    columns (they hold the positions they select), so deriving copies nothing per window but those positions.
    """

    def __init__(self, store: Store, spec: WindowSpec, index: pa.Table | None = None,
                 report: dict[str, Any] | None = None, reader_capacity: int = 4, max_windows: int | None = None):
        self.spec = spec
        self._store = store
        self.modalities: Modalities = resolve_modalities(store, spec)
        if index is None:
            index, report = build_index(store, spec, max_windows=max_windows)
        self._index: pa.Table | None = index
        self._report = report or {}
        self.reader_capacity = reader_capacity
        self._columns = _Columns.from_table(index, spec.sec_ns)
        self._readers: ReaderPool | None = None
        self._video_index: LRU = LRU(VIDEO_INDEX_CACHE)
        self._lock = threading.Lock()
        self._plan: _Plan | None = None

    decode_plans: bool = True  # serve index-order reads from one forward pass per recording (module docstring)
    frame_store_mb: float = 128  # the bound on frames kept for later windows, per process and window set

    @property
    def index(self) -> pa.Table:
        """The window index: one row per window (``recording_id``, ``split``, ``t0_ns``, ``t1_ns``, ``text``,
        ``label``, ``<video>_idx``; see ``mmloader.windows.index``)."""
        if self._index is None:
            self._index = self._columns.table()
        return self._index

    # -- map-style -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._columns)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = position(i, len(self))
        c = self._columns
        fields = self._index_fields(i)
        rid, t0 = c.recording_id[i], int(c.t0[i])
        sample: dict[str, Any] = {k: fields.pop(k) for k in ("recording_id", "t0", "t1", "index")}
        for m in self.modalities.timeseries:
            y, mask = self._read_timeseries(rid, m, t0)
            a = np.ascontiguousarray(y.T)
            # never a view of the process's decoded-chunk cache (one channel: y.T is contiguous already)
            sample[m] = torch.from_numpy(a if a.flags.writeable else a.copy())
            sample[f"{m}_mask"] = torch.from_numpy(mask)
        ahead = self._ahead(i) if self.modalities.video else None
        for v in self.modalities.video:
            frames, t = self._read_video(rid, v, c.video_idx[v][i], t0, ahead)
            sample[v] = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)))
            sample[f"{v}_t"] = torch.from_numpy(t)
        sample.update(fields)  # text, label: after the tensors
        return sample

    @property
    def run_windows(self) -> int:
        """Windows per contiguous run a loader worker reads in index order: 128 with video (a run's frames wait in
        the main process until its turn), 2048 without (IMU chunks hold ~20 windows each: long runs decode each
        chunk in one worker only)."""
        return 128 if self.modalities.video else 2048

    def affinity(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Where windows ``indices`` read their data: int64, equal for windows of the same recording (its rank
        among this set's recordings, 0 .. their number - 1). A loader with workers splits each shuffled batch by
        it, so that every recording is read (and its decoded chunks cached) by one worker only
        (``mmloader.shared_batch``)."""
        p = self._columns.recording_id
        idx = np.asarray(indices, dtype=np.int64)
        if p.kind != "codes":  # (ids are always dictionary codes today; a stable hash of the id otherwise)
            return np.asarray([zlib.crc32(str(r).encode()) for r in p.take(idx)], dtype=np.int64)
        rank = self._columns.recording_rank()
        return rank[p.values[idx if p.rows is None else p.rows[idx]]]

    def read_batch(self, indices: Sequence[int], alloc: Callable[[tuple[int, ...], Any], np.ndarray] | None = None,
                   rows: np.ndarray | None = None, size: int | None = None) -> dict[str, Any] | None:
        """``collate([self[i] for i in indices])`` for sets without video, faster: each window's time-series rows
        are copied straight into the batch tensors (one copy, no per-window tensors); ``alloc(shape, dtype)``, when
        given, makes those arrays (a loader worker's shared-memory slot). With ``rows`` and ``size`` (a part of a
        batch, ``mmloader.shared_batch``): the time-series arrays have ``size`` rows and window ``j`` goes to row
        ``rows[j]`` (the others are left as they are); the per-window values are this part's. None for sets with
        video (read window by window) or an empty batch."""
        if self.modalities.video or len(indices) == 0:
            return None
        idx = self._positions(indices)
        fields = self._fields_batch(idx)
        out = {k: fields.pop(k) for k in ("recording_id", "t0", "t1", "index")}
        t0 = self._columns.t0.take(idx)
        t0s = t0.tolist() if isinstance(t0, np.ndarray) else [int(v) for v in t0]
        at = range(len(idx)) if rows is None else [int(r) for r in rows]
        for m in self.modalities.timeseries:
            data, mask = self._batch_timeseries(m, out["recording_id"], t0s, alloc or np.empty, at,
                                                len(idx) if size is None else size)
            out[m], out[f"{m}_mask"] = data, mask
        out.update(fields)  # text, label: after the tensors
        return out

    def _batch_timeseries(self, m: str, rids: list[str], t0s: list[int],
                          alloc: Callable[[tuple[int, ...], Any], np.ndarray], at: Sequence[int],
                          size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(size, C, T) float32 and (size, T) bool: stream ``m`` of the windows at ``t0s`` in rows ``at``, as
        ``__getitem__`` reads them."""
        n, data, mask = len(self._grid()[0]), None, None
        for b, rid, t0, span in zip(at, rids, t0s, self._grouped_runs(m, rids, t0s)):
            if span is not None:  # (rows (C, L), start): read with the other windows of its recording
                run, valid = span[0][:, span[1]:span[1] + n], None
            else:
                src_hz = self.store.stream_row(rid, m)["rate_hz"] or None
                run, valid = self._regular_rows(rid, m, t0, src_hz), None
                if run is None:
                    run, valid = self._resampled(rid, m, t0, src_hz)
                run = run.T
            if data is None:
                data = alloc((size, run.shape[0], n), np.float32)
                mask = alloc((size, n), np.bool_)
                mask[list(at) if size != len(rids) else ...] = True
            elif run.shape[0] != data.shape[1]:
                raise ValueError(f"stream {m!r} of recording {rid!r} has {run.shape[0]} channels, an earlier window "
                                 f"of this batch {data.shape[1]}: windows of different widths cannot be stacked")
            if valid is not None:
                mask[b] = valid
            data[b] = run
        assert data is not None and mask is not None
        return torch.from_numpy(data), torch.from_numpy(mask)

    def _positions(self, indices: Sequence[int]) -> np.ndarray:
        """``indices`` as int64 positions in ``[0, len)`` (negative ones count from the end), as ``position`` makes
        them one by one; IndexError naming the first outside ``[-len, len)``."""
        n = len(self)
        idx = np.asarray(indices).astype(np.int64, copy=False).reshape(-1)
        bad = (idx < -n) | (idx >= n)
        if bad.any():
            position(int(idx[bad][0]), n)  # raises, naming it
        return idx % n if n else idx

    def _grouped_runs(self, m: str, rids: list[str], t0s: list[int]) -> list[tuple[np.ndarray, int] | None]:
        """Per window of a batch: ``(rows, start)`` when it was read together with nearby windows of its recording
        (``GROUP_MIN`` or more, on a grid that is the stream's own clock: ``Store.regular_runs``, each chunk looked
        up once), its samples ``rows[:, start:start + T]``; None: read alone (as ``__getitem__``)."""
        out: list[tuple[np.ndarray, int] | None] = [None] * len(rids)
        offsets, step = self._grid()
        if not step or len(rids) < GROUP_MIN:
            return out
        groups: dict[str, list[int]] = {}
        for j, rid in enumerate(rids):
            groups.setdefault(rid, []).append(j)
        for rid, js in groups.items():
            if len(js) < GROUP_MIN or not self._own_clock(self.store.stream_row(rid, m)["rate_hz"]):
                continue
            starts = np.asarray([t0s[j] for j in js], dtype=np.int64)
            for near in _clusters(starts, len(offsets) * step):
                if len(near) < GROUP_MIN:
                    continue
                got = self.store.regular_runs(rid, m, starts[near], len(offsets), step)
                if got is not None:
                    for k, start in zip(near, got[1].tolist()):
                        out[js[k]] = (got[0], start) if start >= 0 else None
        return out

    def index_fields(self, i: int) -> dict[str, Any]:
        """Window ``i``'s non-tensor sample values, from the index alone: ``recording_id``, ``t0``, ``t1``
        (float seconds on the recording clock), ``index`` (int), then ``text`` and ``label`` when samples carry them."""
        return self._index_fields(position(i, len(self)))

    def index_fields_batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """``collate([self.index_fields(i) for i in indices])``, gathered column by column: the same values, types
        and key order."""
        return self._fields_batch(np.asarray([position(int(i), len(self)) for i in indices], dtype=np.int64))

    def _fields_batch(self, idx: np.ndarray) -> dict[str, Any]:
        c = self._columns
        out: dict[str, Any] = {"recording_id": c.recording_id.take(idx), "t0": _seconds(c.t0.take(idx)),
                               "t1": _seconds(c.t1.take(idx)), "index": torch.from_numpy(idx.copy())}
        if self.modalities.text:
            out["text"] = collate_values(list(c.text.take(idx)))
        if c.label is not None:  # as collate makes them of index_fields' values (numpy ints stay a list)
            out["label"] = collate_values(list(c.label.take(idx)))
        return out

    def _index_fields(self, i: int) -> dict[str, Any]:
        c = self._columns
        fields: dict[str, Any] = {"recording_id": c.recording_id[i], "t0": int(c.t0[i]) / NS,
                                  "t1": int(c.t1[i]) / NS, "index": i}
        if self.modalities.text:
            fields["text"] = c.text[i]
        if c.label is not None:
            fields["label"] = c.label[i]
        return fields

    def fingerprint_components(self) -> dict[str, Any]:
        """What decides this set's samples, as JSON values (the window cache's key is built from them): the store
        (URL, format version, ``source_fingerprint``, a hash of its whole manifest, so a store re-prepared with
        other options is another store), the spec, the resolved video backend and a hash of the index."""
        manifest = self.store.manifest
        return {
            "store_url": self.store.url,
            "store_format_version": manifest.get("format_version"),
            "store_source_fingerprint": manifest.get("source_fingerprint"),
            "store_manifest_sha256": sha256_json(manifest),
            "spec": canonical_spec(self.spec),
            "video_backend": self.video_backend,
            "index_sha256": index_digest(self.index),
        }

    def __iter__(self):
        """Every window in index order (announced as one run: decode plans from the first window on)."""
        self.will_read(range(len(self)))
        for i in range(len(self)):
            yield self[i]

    # -- window cache (mmloader.cache): a fluent front door -------------------------------------
    def cache(self, url: str = "auto", fill: str = "lazy", progress: bool = True, *, transforms: str | None = None,
              shard_size: int | None = None, overwrite: bool = False, **storage_options: Any) -> "CachedWindows":
        """This set, read through a window cache at ``url`` (any fsspec URL; ``"auto"``:
        ``mmloader.paths.cache_dir()/windows/<fingerprint>``). See ``docs/cache.md``.

        Reads return exactly (bit-identical tensors, same dtypes and shapes) what this set returns. ``fill=
        "lazy"`` fills the cache as windows are read (a miss reads its whole shard from the store, once, in
        whichever process reads it); ``"eager"`` builds every missing, torn or corrupt shard now (``progress``:
        a progress bar). ``transforms``: an identifier of anything beyond the spec that changes what the set
        yields, made part of the fingerprint. ``overwrite=True`` replaces another set's cache at ``url``
        (else ``CacheError``). Selecting (``split``, ``filter``...) on the result gives an uncached set: cache
        the selection instead. The result is a ``mmloader.cache.CachedWindows``.
        """
        from ..cache import cache_windows

        return cache_windows(self, url, fill, progress, transforms=transforms, shard_size=shard_size,
                             overwrite=overwrite, **storage_options)

    window_cache: Any = None  # a WindowSet reads no cache; a cached view's ``window_cache`` is its WindowCache
    _grid_offsets: np.ndarray | None = None  # spec.grid_offsets_ns(), computed once
    _grid_step: int = 0  # its step (ns) when every offset is k * step exactly, else 0

    # -- reading ---------------------------------------------------------------------------------
    def _grid(self) -> tuple[np.ndarray, int]:
        """The IMU grid offsets from t0 (ns) and their exact step, or 0 (``grid_and_step``), computed once."""
        if self._grid_offsets is None:
            self._grid_offsets, self._grid_step = grid_and_step(self.spec)
        return self._grid_offsets, self._grid_step

    def _read_timeseries(self, rid: str, m: str, t0: int) -> tuple[np.ndarray, np.ndarray]:
        src_hz = self.store.stream_row(rid, m)["rate_hz"] or None
        run = self._regular_rows(rid, m, t0, src_hz)
        if run is not None:  # (T, C) as a view of a (C, T) copy: the sample's channels-first tensor needs no other
            return np.ascontiguousarray(run.T, dtype=np.float32).T, np.ones(run.shape[0], dtype=bool)
        return self._resampled(rid, m, t0, src_hz)

    def _regular_rows(self, rid: str, m: str, t0: int, src_hz: float | None) -> np.ndarray | None:
        """The window's rows when the grid is the stream's own clock (``Store.regular_run``): what resampling's exact
        case would return for them; None when it is not (then ``_resampled``)."""
        if not self._own_clock(src_hz):
            return None
        offsets, step = self._grid()
        return self.store.regular_run(rid, m, t0, len(offsets), step)

    def _own_clock(self, src_hz: float | None) -> bool:
        """Whether windows of a stream at ``src_hz`` lie on its own clock: the grid is ``k * step`` exactly and the
        stream is not so fast that resampling would filter it (then its rows are the window's samples)."""
        return bool(self._grid()[1] and src_hz and src_hz <= DOWNSAMPLE_RATIO * self.spec.imu_hz)

    def _resampled(self, rid: str, m: str, t0: int, src_hz: float | None) -> tuple[np.ndarray, np.ndarray]:
        """The window resampled onto its grid (``resample``): ``(T, C)`` float32 and the ``(T,)`` mask."""
        spec = self.spec
        grid = t0 + self._grid()[0]
        # a few samples beyond the grid on each side so edge slopes are centred, plus the filter's support
        margin = (filter_support_ns(src_hz, spec.imu_hz) + int(4e9 / src_hz)) if src_hz else 50_000_000
        t, x = self.store.timeseries_slice(rid, m, int(grid[0]) - margin, int(grid[-1]) + margin)
        period = 1e9 / src_hz if src_hz else (float(np.median(np.diff(t))) if len(t) > 1 else 1e9)
        return resample(t, x, grid, spec.imu_hz, source_hz=src_hz, max_gap_ns=int(5 * period))

    def _pts(self, rid: str, v: str) -> tuple[np.ndarray, np.ndarray]:
        return self._video_index.get((rid, v), lambda: self.store.video_index(rid, v))

    def _media(self, rid: str, v: str) -> tuple[str, dict[str, Any], MediaIdentity | None]:
        """(URL, fsspec options, identity recorded at prepare) of a video stream's media file: relative
        uris are inside the store (resolved against its URL); the store's storage_options apply to media on
        the store's protocol."""
        row = self.store.stream_row(rid, v)
        url = media_url(self.store.url, row["uri"])
        return url, media_storage_options(self.store.url, url, self.store.storage_options), MediaIdentity.from_row(row)

    def _read_video(self, rid: str, v: str, idx: np.ndarray, t0: int,
                    ahead: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        pts, key = self._pts(rid, v)
        url, options, identity = self._media(rid, v)
        with self._lock:  # decoders are not thread-safe: one thread at a time per process
            reader = self.readers.get(url, pts, key, self.spec.size, storage_options=options, identity=identity,
                                      recording_id=rid, stream=v)
            if ahead is None:
                frames = reader.get_frames(idx)
            else:
                frames = self._planned_frames(reader, (url, self.spec.size), rid, v, idx, ahead)
        return frames, ((pts[idx] - t0) / NS).astype(np.float32)

    # -- decode plans (module docstring) ---------------------------------------------------------
    def will_read(self, indices: Sequence[int] | np.ndarray | None) -> None:
        """Tell this set that this process will read ``indices`` next, in that order (the loader does). An
        ascending run is decoded forward through a decode plan from its first window on; anything else (or
        None) announces no run, and only reads of window ``i`` right after window ``i - 1`` use plans."""
        with self._lock:
            self._plan_state().announce(indices)

    def _plan_state(self) -> _Plan:
        bound = int(self.frame_store_mb * 2**20)
        if self._plan is None or self._plan.pid != os.getpid() or self._plan.store.max_bytes != bound:
            self._plan = _Plan(bound)  # new in this process, or frame_store_mb was changed
        return self._plan

    def _ahead(self, i: int) -> np.ndarray | None:
        """The windows that follow ``i`` in this process's index-order reading, or None (no plan for ``i``)."""
        if not self.decode_plans:
            return None
        with self._lock:
            return self._plan_state().ahead(i, len(self))

    def _planned_frames(self, reader: VideoReader, media: tuple, rid: str, v: str, idx: np.ndarray,
                        ahead: np.ndarray) -> np.ndarray:
        """Window frames ``idx`` from the store; those missing are decoded in one sorted batch together with
        the frames up to the window's last that later windows of ``rid`` need (kept in the store for them)."""
        if not len(idx):
            return reader.get_frames(idx)
        plan = self._plan_state()
        store = plan.store
        want = np.unique(idx)
        got = {int(f): store.get(media, f) for f in want}
        later, nxt = self._later_frames(rid, v, ahead, int(want[-1]), plan.frame_bytes.get(media), store)
        batch = sorted({f for f, a in got.items() if a is None} | {f for f in later if store.get(media, f) is None})
        if batch:
            for f, frame in zip(batch, reader.get_frames(batch)):
                plan.frame_bytes[media] = frame.nbytes
                if f in got:
                    got[f] = frame
                if f in later:
                    store.put(media, f, frame)
        store.drop(media, below=nxt)
        return np.stack([got[int(f)] for f in idx])

    def _later_frames(self, rid: str, v: str, ahead: np.ndarray, cutoff: int, frame_bytes: int | None,
                      store: FrameStore) -> tuple[set[int], int | None]:
        """(frames up to ``cutoff`` that the windows ``ahead`` of recording ``rid`` need, as many as the store
        can hold; the first frame of the next window of ``rid``, None when there is none). ``frame_bytes``: the
        size of one decoded frame when known (else from the spec's size, or 1080p)."""
        c = self._columns
        size = self.spec.size
        frame_bytes = frame_bytes or (size[0] * size[1] * 3 if size else 1920 * 1080 * 3)
        room = max(0, store.max_bytes // frame_bytes - len(store))
        later: set[int] = set()
        nxt = None
        for j in ahead:
            if c.recording_id[j] != rid:
                break
            fj = c.video_idx[v][j]
            if not len(fj):
                continue
            if nxt is None:
                nxt = int(fj.min())
            if fj.min() > cutoff:
                break
            new = {int(f) for f in fj if f <= cutoff}
            if len(later | new) > room:
                break
            later |= new
        return later, nxt

    # -- lazily opened, per process --------------------------------------------------------------
    @property
    def store(self) -> Store:
        return self._store

    @property
    def readers(self) -> ReaderPool:
        if self._readers is None or self._readers._pid != os.getpid():
            self._readers = ReaderPool(self.spec.video_backend, capacity=self.reader_capacity)
        return self._readers

    @property
    def video_backend(self) -> str | None:
        """The backend that decodes this set's frames (``auto`` resolved for its first video), or None."""
        if not self.modalities.video or len(self) == 0:
            return None
        url = self._media(self._columns.recording_id[0], self.modalities.video[0])[0]
        return reader_backend(self.spec.video_backend, url)

    def __getstate__(self) -> dict[str, Any]:
        """What a worker receives: the columns of this set's windows only (a derived set's selection gathered,
        ~11 B per IMU-only window), not the Arrow index (rebuilt when asked) nor per-process state."""
        state = {k: v for k, v in self.__dict__.items() if k not in _PER_PROCESS}
        state["_columns"] = self._columns.compact()
        state["_index"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._readers, self._video_index, self._plan = None, LRU(VIDEO_INDEX_CACHE), None
        self._lock = threading.Lock()

    # -- selection -------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """Candidates, kept windows and dropped windows per reason (kept + dropped == candidates)."""
        return dict(self._report)

    def _subset(self, mask: np.ndarray, why: str) -> "WindowSet":
        """The windows where ``mask`` (bool, one per window) holds: a view sharing this set's columns."""
        columns = self._columns.select(np.flatnonzero(mask))
        report = dict(self._report)
        report["selected"] = report.get("selected", []) + [f"{why}: {len(columns)} of {len(self)}"]
        out = WindowSet.__new__(WindowSet)
        out.__setstate__({**{k: v for k, v in self.__dict__.items() if k not in _PER_PROCESS},
                          "_columns": columns, "_index": None, "_report": report})
        return out

    def split(self, name: str) -> "WindowSet":
        """Windows of the recordings in split ``name`` (splits are per recording, never per window). A split the
        store has but with no windows here gives an empty set; one the store lacks: ValueError listing them."""
        check_split(self._store, name)
        return self._subset(self._columns.isin("split", [name]), f"split={name}")

    def recordings(self, ids: Iterable[str] | str) -> "WindowSet":
        """Windows of the given recordings only (one string is one id). Ids the store lacks: ValueError."""
        ids = [ids] if isinstance(ids, str) else list(ids)
        bad = [i for i in ids if not isinstance(i, str)]
        if bad:
            raise TypeError(f"ids must be recording ids (strings), got {bad[0]!r} ({type(bad[0]).__name__})")
        known = set(self._store.recordings["recording_id"].to_pylist())
        missing = [i for i in dict.fromkeys(ids) if i not in known]
        if missing:
            raise ValueError(f"ids: {len(missing)} recording(s) not in {self._store.url}: {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        return self._subset(self._columns.isin("recording_id", ids), "recordings")

    def filter(self, predicate: Callable[[dict[str, Any]], bool] | Sequence[bool] | np.ndarray) -> "WindowSet":
        """Windows whose index row satisfies ``predicate(row)`` (a dict of the index columns), or a bool mask."""
        if callable(predicate):
            mask = np.array([bool(predicate(r)) for b in self.index.to_batches(1 << 16) for r in b.to_pylist()],
                            dtype=bool)
        else:
            mask = np.asarray(predicate)
            if mask.dtype != bool and not (mask.size == 0 and mask.dtype == np.float64):  # [] is an empty mask
                raise TypeError(f"predicate must be a callable or a bool mask, got an array of {mask.dtype} "
                                "(indices? use ws.filter(np.isin(np.arange(len(ws)), indices)))")
            mask = mask.astype(bool)
            if mask.shape != (len(self),):
                raise ValueError(f"mask has shape {mask.shape}, expected ({len(self)},)")
        return self._subset(mask, "filter")

    def loader(self, batch_size: int = 32, shuffle: bool | str = False, seed: int = 0, num_workers: int = 0,
               **kw: Any):
        """A resumable, shardable PyTorch loader over this set (see ``mmloader.loader.WindowLoader``). ``shuffle``:
        False (index order), True (a full permutation) or ``"block"`` (a block shuffle: ``block_windows``,
        ``buffer_blocks``). ``**kw`` passes its other arguments through (``drop_last``, ``rank``, ``world_size``,
        ``even_shards``, ``prefetch``, ``pin_memory``, ``collate_fn``, ``multiprocessing_context``,
        ``persistent_workers``, ``timeout``, ``block_windows``, ``buffer_blocks``)."""
        from ..loader import WindowLoader

        return WindowLoader(self, batch_size=batch_size, shuffle=shuffle, seed=seed, num_workers=num_workers, **kw)

    def __repr__(self) -> str:
        mods = [*self.modalities.timeseries, *self.modalities.video] + (["text"] if self.modalities.text else [])
        return f"WindowSet({len(self)} windows of {self.spec.sec:g} s, modalities={mods}, anchor={self.spec.anchor!r})"


_PER_PROCESS = ("_readers", "_video_index", "_plan", "_lock")  # state a pickled or derived set starts afresh


def _seconds(ns: Any) -> torch.Tensor:
    """float64 seconds of nanoseconds (an int64 array, or a list of ints from an index column of another type),
    each exactly ``int(v) / NS`` (one rounding: numpy divides in float64 where every value is below 2**53, where
    Python's int division does the same)."""
    if isinstance(ns, np.ndarray) and ns.dtype == np.int64 and (ns.size == 0 or int(np.abs(ns).max()) < 2**53):
        return torch.from_numpy(ns.astype(np.float64) / NS)
    return torch.tensor([int(v) / NS for v in (ns.tolist() if isinstance(ns, np.ndarray) else ns)],
                        dtype=torch.float64)


class _Picked:
    """One index column as a window set sees it: entry ``i`` is the column's entry ``rows[i]`` (``rows`` None:
    entry ``i``). Sets derived from one set share ``values`` and differ in ``rows``; writing an entry first gives
    the column its own copy. ``kind`` says how ``values`` hold the column:

    - ``codes``: int codes into ``aux``, the column's distinct values (recording ids, splits, None for null);
    - ``ints``: int64 numpy (``t0_ns``); ``shift``: ``values + aux`` (``t1_ns`` when it is ``t0_ns + sec``, sharing
      ``t0_ns``'s array);
    - ``frames``: (windows, frames) int32 numpy (a ``<video>_idx`` list of the same length in every row), entries
      read as int64 arrays; ``list``: an Arrow list column of integers (ragged), entries read as int64 arrays;
    - ``arrow``: any other Arrow column, entries read as Python values.
    """

    __slots__ = ("kind", "values", "rows", "aux")

    def __init__(self, kind: str, values: Any, rows: np.ndarray | None = None, aux: Any = None):
        self.kind, self.values, self.rows, self.aux = kind, values, rows, aux

    def __len__(self) -> int:
        return len(self.values) if self.rows is None else len(self.rows)

    def __getitem__(self, i: int) -> Any:
        v = self.values[i if self.rows is None else self.rows[i]]
        kind = self.kind
        if kind == "codes":
            return self.aux[v]
        if kind == "shift":
            return v + self.aux
        if kind == "frames":
            return v.astype(np.int64)
        if kind == "list":
            return np.asarray(v.values.to_numpy(zero_copy_only=False), dtype=np.int64)
        return v.as_py() if kind == "arrow" else v

    def take(self, idx: np.ndarray) -> Any:
        """Entries ``idx`` at once: int64 numpy for ``ints`` / ``shift``, else a list of what ``self[i]`` gives."""
        kind = self.kind
        if kind in ("ints", "shift", "codes"):
            v = self.values[idx if self.rows is None else self.rows[idx]]
            if kind == "codes":
                aux = self.aux
                return [aux[k] for k in v.tolist()]
            return v + self.aux if kind == "shift" else v
        return [self[int(i)] for i in idx]

    def __setitem__(self, i: int, value: Any) -> None:
        if self.kind not in ("ints", "frames"):
            raise TypeError(f"index entries of kind {self.kind!r} cannot be written")
        own = np.array(self.gathered())  # this column's own, writable copy: the sets sharing it are unchanged
        own[i] = value
        self.values, self.rows = own, None

    def __iter__(self):
        for k in range(len(self)):
            yield self[k]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        g = self.gathered()
        if self.kind == "shift":
            return np.asarray(g + self.aux, dtype=dtype)
        return np.asarray([self.aux[k] for k in g.tolist()] if self.kind == "codes" else g, dtype=dtype)

    def gathered(self) -> Any:
        """``values`` of the selected entries, in order (``values`` itself when nothing is selected)."""
        if self.rows is None:
            return self.values
        if isinstance(self.values, np.ndarray):
            return self.values[self.rows]
        return self.values.take(pa.array(self.rows))

    def arrow(self, type_: pa.DataType) -> pa.Array:
        """The selected entries as an Arrow array of ``type_`` (what the column was built from)."""
        g = self.gathered()
        if self.kind == "codes":
            out = pa.array(self.aux, type_).take(pa.array(g))
        elif self.kind in ("ints", "shift"):
            out = pa.array(g + self.aux if self.kind == "shift" else g, pa.int64())
        elif self.kind == "frames":
            offsets = pa.array(np.arange(len(g) + 1, dtype=np.int64) * g.shape[1], pa.int32())
            out = pa.ListArray.from_arrays(offsets, pa.array(g.ravel(), pa.int32()))
        else:
            out = g
        return out.cast(type_)


class _Columns:
    """The index as arrays for per-window access, one ``_Picked`` per column of ``schema``: ``recording_id``,
    ``t0``, ``t1``, ``text`` and ``label`` (None when absent), ``video_idx[video]``; ``len``. Nothing per window
    is a Python object: strings are int codes (2 B a window for up to 32,767 recordings, 1 B for splits)."""

    def __init__(self, schema: pa.Schema, cols: dict[str, _Picked]):
        self.schema, self.cols = schema, cols
        self.recording_id, self.t0, self.t1 = cols["recording_id"], cols["t0_ns"], cols["t1_ns"]
        self.text, self.label = cols.get("text"), cols.get("label")
        self.video_idx = {name[:-4]: p for name, p in cols.items() if name.endswith("_idx")}
        self._rank: np.ndarray | None = None

    def recording_rank(self) -> np.ndarray:
        """Per ``recording_id`` code: the recording's rank among those these windows have (0 .. their number - 1;
        a derived set's codes are its parent's, with gaps), made once."""
        if self._rank is None:
            p = self.recording_id
            codes = np.unique(p.values if p.rows is None else p.values[p.rows])
            rank = np.zeros(int(codes[-1]) + 1 if len(codes) else 0, dtype=np.int64)
            rank[codes] = np.arange(len(codes))
            self._rank = rank
        return self._rank

    def __len__(self) -> int:
        return len(self.t0)

    @classmethod
    def from_table(cls, index: pa.Table, sec_ns: int) -> "_Columns":
        """The columns of ``index`` (zero-copy where Arrow allows: ``t0_ns``, frame indices)."""
        cols: dict[str, _Picked] = {}
        for f in index.schema:
            col = index[f.name]
            col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()  # one chunk: no copy
            t = col.type
            if (pa.types.is_string(t) or pa.types.is_large_string(t)) and f.name in ("recording_id", "split"):
                enc = pc.dictionary_encode(col, null_encoding="encode")
                names = enc.dictionary.to_pylist()
                dtype = np.int8 if len(names) < 2**7 else np.int16 if len(names) < 2**15 else np.int32
                cols[f.name] = _Picked("codes", enc.indices.to_numpy(zero_copy_only=False).astype(dtype), aux=names)
            elif pa.types.is_int64(t) and col.null_count == 0:
                cols[f.name] = _Picked("ints", col.to_numpy())
            elif pa.types.is_list(t) and pa.types.is_integer(t.value_type) and col.null_count == 0:
                lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
                if len(lengths) and np.all(lengths == lengths[0]) and pa.types.is_int32(t.value_type):
                    flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
                    cols[f.name] = _Picked("frames", flat.reshape(len(col), int(lengths[0])))
                else:
                    cols[f.name] = _Picked("list", col)
            else:
                cols[f.name] = _Picked("arrow", col)
        t0, t1 = cols.get("t0_ns"), cols.get("t1_ns")
        if t0 is not None and t1 is not None and t0.kind == t1.kind == "ints" and all(
                np.array_equal(t1.values[k:k + 65536], t0.values[k:k + 65536] + sec_ns)
                for k in range(0, len(t0), 65536)):
            cols["t1_ns"] = _Picked("shift", t0.values, aux=sec_ns)
        pa.default_memory_pool().release_unused()  # the encoders' temporaries go back to the system
        return cls(index.schema, cols)

    def select(self, positions: np.ndarray) -> "_Columns":
        """The windows at ``positions`` (int, into this set) as a view: the same arrays, the composed selection."""
        positions = np.asarray(positions, dtype=np.int32 if len(self) < 2**31 else np.int64)
        composed: dict[int, np.ndarray] = {}
        cols = {}
        for name, p in self.cols.items():
            key = id(p.rows)
            if key not in composed:
                composed[key] = positions if p.rows is None else p.rows[positions]
            cols[name] = _Picked(p.kind, p.values, composed[key], p.aux)
        return _Columns(self.schema, cols)

    def compact(self) -> "_Columns":
        """These windows' own columns, selections gathered (self when nothing is selected): what is pickled."""
        if all(p.rows is None for p in self.cols.values()):
            return self
        cols = {name: _Picked(p.kind, p.gathered(), None, p.aux) for name, p in self.cols.items()}
        for name, p in cols.items():
            if p.kind == "shift" and self.cols[name].values is self.t0.values:
                p.values = cols["t0_ns"].values  # t1 shares t0's array, as before
        return _Columns(self.schema, cols)

    def table(self) -> pa.Table:
        """The window index of these windows, equal to the table the columns came from (selection applied)."""
        return pa.Table.from_arrays([self.cols[f.name].arrow(f.type) for f in self.schema], schema=self.schema)

    def isin(self, name: str, values: Sequence[Any]) -> np.ndarray:
        """Bool mask: the window's ``name`` (``recording_id`` or ``split``) is one of ``values``."""
        p = self.cols[name]
        if p.kind == "codes":
            wanted = set(values)
            codes = [k for k, v in enumerate(p.aux) if v in wanted]
            return np.isin(p.gathered(), np.asarray(codes, dtype=np.int64))
        col = p.arrow(self.schema.field(name).type).cast(pa.string())  # e.g. a null-typed column of a hand-made index
        return pc.fill_null(pc.is_in(col, pa.array(list(values), pa.string())), False).to_numpy(zero_copy_only=False)
