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
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..lru import LRU
from .collate import collate
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


def grid_and_step(spec: WindowSpec) -> tuple[np.ndarray, int]:
    """The IMU grid offsets of ``spec`` (ns from t0) and their step when every offset is exactly ``k * step``
    (e.g. 200 Hz: 5 ms), else 0 (e.g. 30 Hz, whose offsets are rounded)."""
    offsets = spec.grid_offsets_ns()
    if len(offsets) < 2:
        return offsets, 0
    step = int(offsets[1] - offsets[0])
    exact = step > 0 and np.array_equal(offsets, np.arange(len(offsets), dtype=np.int64) * step)
    return offsets, step if exact else 0


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

    Picklable and cheap to send to workers: it carries the index (Arrow) and the store URL; the store,
    video readers and caches are opened lazily in the process that reads.
    """

    def __init__(self, store: Store, spec: WindowSpec, index: pa.Table | None = None,
                 report: dict[str, Any] | None = None, reader_capacity: int = 4, max_windows: int | None = None):
        self.spec = spec
        self._store = store
        self.modalities: Modalities = resolve_modalities(store, spec)
        if index is None:
            index, report = build_index(store, spec, max_windows=max_windows)
        self.index = index
        self._report = report or {}
        self.reader_capacity = reader_capacity
        self._columns = _Columns(index)
        self._readers: ReaderPool | None = None
        self._video_index: LRU = LRU(VIDEO_INDEX_CACHE)
        self._lock = threading.Lock()
        self._plan: _Plan | None = None

    decode_plans: bool = True  # serve index-order reads from one forward pass per recording (module docstring)
    frame_store_mb: float = 128  # the bound on frames kept for later windows, per process and window set

    # -- map-style -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.index.num_rows

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = position(i, len(self))
        c = self._columns
        fields = self._index_fields(i)
        rid, t0 = c.recording_id[i], int(c.t0[i])
        sample: dict[str, Any] = {k: fields.pop(k) for k in ("recording_id", "t0", "t1", "index")}
        for m in self.modalities.timeseries:
            y, mask = self._read_timeseries(rid, m, t0)
            sample[m] = torch.from_numpy(np.ascontiguousarray(y.T))
            sample[f"{m}_mask"] = torch.from_numpy(mask)
        ahead = self._ahead(i) if self.modalities.video else None
        for v in self.modalities.video:
            frames, t = self._read_video(rid, v, c.video_idx[v][i], t0, ahead)
            sample[v] = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)))
            sample[f"{v}_t"] = torch.from_numpy(t)
        sample.update(fields)  # text, label: after the tensors
        return sample

    def read_batch(self, indices: Sequence[int]) -> dict[str, Any] | None:
        """``collate([self[i] for i in indices])`` for sets without video, faster: each window's time-series rows
        are copied straight into the batch tensors (one copy, no per-window tensors). None for sets with video
        (read window by window) or an empty batch."""
        if self.modalities.video or len(indices) == 0:
            return None
        idx = [position(int(i), len(self)) for i in indices]
        c = self._columns
        fields = [self._index_fields(i) for i in idx]
        head = ("recording_id", "t0", "t1", "index")
        out = collate([{k: f.pop(k) for k in head} for f in fields])
        for m in self.modalities.timeseries:
            data, mask = self._batch_timeseries(m, [c.recording_id[i] for i in idx], [int(c.t0[i]) for i in idx])
            out[m], out[f"{m}_mask"] = data, mask
        if fields[0]:
            out.update(collate(fields))  # text, label: after the tensors
        return out

    def _batch_timeseries(self, m: str, rids: list[str], t0s: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, T) float32 and (B, T) bool: stream ``m`` of the windows at ``t0s``, as ``__getitem__`` reads them."""
        if self._grid_offsets is None:
            self._grid_offsets, self._grid_step = grid_and_step(self.spec)
        n, data = len(self._grid_offsets), None
        mask = np.ones((len(rids), n), dtype=bool)
        fast = self._grid_step and self.spec.imu_hz
        for b, (rid, t0) in enumerate(zip(rids, t0s)):
            src_hz = self.store.stream_row(rid, m)["rate_hz"] or None
            run = None
            if fast and src_hz and src_hz <= DOWNSAMPLE_RATIO * self.spec.imu_hz:
                run = self.store.regular_run(rid, m, t0, n, self._grid_step)
            if run is None:
                run, mask[b] = self._read_timeseries(rid, m, t0)
            if data is None:
                data = np.empty((len(rids), run.shape[1], n), dtype=np.float32)
            elif run.shape[1] != data.shape[1]:
                raise ValueError(f"stream {m!r} of recording {rid!r} has {run.shape[1]} channels, an earlier window "
                                 f"of this batch {data.shape[1]}: windows of different widths cannot be stacked")
            data[b] = run.T
        assert data is not None
        return torch.from_numpy(data), torch.from_numpy(mask)

    def index_fields(self, i: int) -> dict[str, Any]:
        """Window ``i``'s non-tensor sample values, from the index alone: ``recording_id``, ``t0``, ``t1``
        (float seconds on the recording clock), ``index`` (int), then ``text`` and ``label`` when samples carry them."""
        return self._index_fields(position(i, len(self)))

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
    def _read_timeseries(self, rid: str, m: str, t0: int) -> tuple[np.ndarray, np.ndarray]:
        spec = self.spec
        if self._grid_offsets is None:
            self._grid_offsets, self._grid_step = grid_and_step(spec)
        n = len(self._grid_offsets)
        src_hz = self.store.stream_row(rid, m)["rate_hz"] or None
        if self._grid_step and src_hz and src_hz <= DOWNSAMPLE_RATIO * spec.imu_hz:
            # the grid is the stream's own clock here: its rows, as resample's exact case would return them
            # ((T, C) as a view of a (C, T) copy: the sample's channels-first tensor needs no second copy)
            run = self.store.regular_run(rid, m, t0, n, self._grid_step)
            if run is not None:
                return np.ascontiguousarray(run.T, dtype=np.float32).T, np.ones(n, dtype=bool)
        grid = t0 + self._grid_offsets
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
        state = self.__dict__.copy()
        state["_readers"] = None
        state["_video_index"] = LRU(VIDEO_INDEX_CACHE)
        state["_plan"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- selection -------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """Candidates, kept windows and dropped windows per reason (kept + dropped == candidates)."""
        return dict(self._report)

    def _subset(self, mask: np.ndarray | pa.Array, why: str) -> "WindowSet":
        if isinstance(mask, (pa.Array, pa.ChunkedArray)):
            mask = mask.cast(pa.bool_())  # an empty index's comparison may come back null-typed
        else:
            mask = pa.array(np.asarray(mask, dtype=bool), type=pa.bool_())
        index = self.index.filter(mask)
        report = dict(self._report)
        report["selected"] = report.get("selected", []) + [f"{why}: {index.num_rows} of {self.index.num_rows}"]
        out = WindowSet(self._store, self.spec, index, report, self.reader_capacity)
        out.__dict__.update({k: v for k, v in self.__dict__.items() if k in ("decode_plans", "frame_store_mb")})
        return out

    def split(self, name: str) -> "WindowSet":
        """Windows of the recordings in split ``name`` (splits are per recording, never per window). A split the
        store has but with no windows here gives an empty set; one the store lacks: ValueError listing them."""
        check_split(self._store, name)
        return self._subset(pc.fill_null(pc.equal(self.index["split"], name), False), f"split={name}")

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
        return self._subset(pc.is_in(self.index["recording_id"], pa.array(ids, pa.string())), "recordings")

    def filter(self, predicate: Callable[[dict[str, Any]], bool] | Sequence[bool] | np.ndarray) -> "WindowSet":
        """Windows whose index row satisfies ``predicate(row)`` (a dict of the index columns), or a bool mask."""
        if callable(predicate):
            mask = np.array([bool(predicate(r)) for r in self.index.to_pylist()], dtype=bool)
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


class _Columns:
    """The index as plain arrays for fast per-sample access."""

    def __init__(self, index: pa.Table):
        self.recording_id = index["recording_id"].to_pylist()
        self.t0 = index["t0_ns"].to_numpy()
        self.t1 = index["t1_ns"].to_numpy()
        self.text = index["text"].to_pylist() if "text" in index.column_names else None
        self.label = index["label"].to_pylist() if "label" in index.column_names else None
        self.video_idx: dict[str, list[np.ndarray]] = {}
        for name in index.column_names:
            if name.endswith("_idx"):
                col = index[name].combine_chunks()
                flat = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
                offsets = col.offsets.to_numpy()
                self.video_idx[name[:-4]] = [flat[offsets[j]:offsets[j + 1]] for j in range(len(col))]
