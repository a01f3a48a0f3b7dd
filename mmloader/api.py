"""``mmloader.open``: a name, a source folder or a store URL → a ``Dataset``."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
from collections import Counter
from typing import TYPE_CHECKING, Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from .coordinate import prepare_once
from .recipes import available, get_adapter
from .errors import StoreFormatError
from .fsutil import get_fs, join, probe_exists
from .paths import cache_dir
from .store import Store
from .store.reader import TimeSeries
from .store.schema import MANIFEST

if TYPE_CHECKING:
    from .windows.dataset import WindowSet


class Dataset:
    """A prepared store seen as recordings and their modalities.

    ``recordings`` (Arrow table): recording_id, dataset, split, duration_ns, modalities, meta_json.
    ``streams`` (Arrow table): one row per (recording, stream). Times are int64 ns on each recording's clock.
    """

    def __init__(self, store: Store):
        self.store = store

    @property
    def url(self) -> str:
        return self.store.url

    @property
    def name(self) -> str:
        return self.store.dataset

    @property
    def recordings(self) -> pa.Table:
        return self.store.recordings

    @property
    def streams(self) -> pa.Table:
        return self.store.streams

    @property
    def recording_ids(self) -> list[str]:
        return self.store.recordings["recording_id"].to_pylist()

    @property
    def modalities(self) -> list[str]:
        """Stream names present in at least one recording (e.g. ``imu``, ``video``, ``narrations``)."""
        return self.store.modalities

    @property
    def splits(self) -> dict[str, int]:
        """Recordings per split (``None`` for recordings without one)."""
        return dict(Counter(self.store.recordings["split"].to_pylist()))

    def recordings_with(self, *modalities: str) -> list[str]:
        """Ids of the recordings that have every one of ``modalities``."""
        rows = self.store.recordings.select(["recording_id", "modalities"]).to_pylist()
        return [r["recording_id"] for r in rows if set(modalities) <= set(r["modalities"])]

    def split(self, name: str) -> list[str]:
        """Ids of the recordings of one split (a split the store does not have: ValueError listing its splits)."""
        from .windows.spec import check_split

        check_split(self.store, name)
        mask = pc.equal(self.store.recordings["split"], name)
        return self.store.recordings.filter(mask)["recording_id"].to_pylist()

    def events(self, name: str = "narrations") -> pa.Table:
        """An events table: recording_id, t_start_ns, t_end_ns, text, text_raw, kind, source, uid."""
        return self.store.events(name)

    def timeseries(self, recording_id: str, stream: str = "imu") -> TimeSeries:
        """A whole time series of one recording (``t_ns``, ``data (N, C)``)."""
        return self.store.read_timeseries(recording_id, stream)

    def windows(
        self,
        sec: float,
        stride: float | None = None,
        modalities: Sequence[str] = ("imu",),
        anchor: str = "tile",
        imu_hz: float = 200.0,
        frames: int | None = None,
        video_fps: float | None = None,
        size: tuple[int, int] | None = None,
        split: str | None = None,
        max_windows: int | None = None,
        **options: Any,
    ) -> "WindowSet":
        """Cut fixed windows of ``sec`` seconds and check them all now (see ``mmloader.windows``).

        ``modalities``: stream names (``imu``, ``video``...) and ``text``; one string is one modality
        (``"imu"`` is ``["imu"]``). ``frames=F`` frames at the centres of F equal parts of the window, or
        ``video_fps``; ``size=(H, W)`` resizes at decode time. ``split`` keeps the windows of one split (one the
        store has: else ValueError listing them). ``label_stream="activities"`` adds each window's ``label`` (the
        segment covering most of it). Further options: ``text_stream``, ``video_tolerance_sec``,
        ``max_masked_fraction``, ``video_backend`` ("auto", "pyav", "decord", "torchcodec").

        Every argument is checked before the index is built (ValueError/TypeError naming it); the bounds
        (``docs/windows.md``, "Options and their limits") keep one call's memory bounded: ``sec * imu_hz`` at
        most 10^6 samples, at most 1000 frames per window and no more than a window holds at the video's rate, and at most
        ``max_windows`` (default 10^7) candidate windows, counted from the recordings' spans first.
        """
        from .windows.spec import WindowSpec, check_split
        from .windows.dataset import WindowSet

        spec = WindowSpec(sec=sec, stride=stride, modalities=modalities, anchor=anchor, imu_hz=imu_hz,
                          frames=frames, video_fps=video_fps, size=size, **options)
        if split is not None:
            check_split(self.store, split)
        ws = WindowSet(self.store, spec, max_windows=max_windows)
        return ws.split(split) if split is not None else ws

    def report(self) -> dict[str, Any]:
        """What the recipe fixed, dropped and found while preparing (per recording)."""
        return self.store.report()

    def validate(self) -> list[str]:
        """Problems found by a full check of the store's files (empty when intact)."""
        return self.store.validate()

    def info(self) -> dict[str, Any]:
        """A summary: dataset, URL, recordings, splits, per-modality counts, total hours and the video transcode
        profile the store was prepared with (None: the source videos as they are)."""
        per_stream: dict[str, dict[str, Any]] = {}
        for row in self.store.streams.select(["stream", "kind", "n_samples", "t_start_ns", "t_end_ns", "rate_hz"]).to_pylist():
            s = per_stream.setdefault(row["stream"], {"kind": row["kind"], "recordings": 0, "samples": 0, "hours": 0.0})
            s["recordings"] += 1
            s["samples"] += int(row["n_samples"])
            if row["kind"] != "events" and row["t_start_ns"] is not None:
                s["hours"] += (row["t_end_ns"] - row["t_start_ns"]) / 3.6e12
        for s in per_stream.values():
            s["hours"] = round(s["hours"], 4)
        total = sum(self.store.recordings["duration_ns"].to_pylist()) / 3.6e12
        return {
            "dataset": self.name,
            "url": self.url,
            "format_version": self.store.manifest["format_version"],
            "created_by": self.store.manifest["created_by"],
            "recordings": self.store.recordings.num_rows,
            "hours": round(total, 4),
            "splits": {str(k): v for k, v in sorted(self.splits.items(), key=lambda kv: str(kv[0]))},
            "modalities": per_stream,
            "gaps": self.store.gaps.num_rows,
            "video_profile": (self.store.manifest.get("options") or {}).get("video_profile"),
        }

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, url={self.url!r}, recordings={self.store.recordings.num_rows}, modalities={self.modalities})"


def _is_store(url: str) -> bool:
    fs, path = get_fs(url)
    return probe_exists(fs, join(path, MANIFEST), url)


def open(  # noqa: A001 - mirrors the builtin on purpose: mmloader.open(...)
    name_or_url: str | os.PathLike,
    root: str | os.PathLike | None = None,
    *,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
    storage_options: dict[str, Any] | None = None,
    **options: Any,
) -> Dataset:
    """Open a dataset.

    - ``open("/path/or/s3://store")``: a prepared store (a folder with ``mmloader.json``).
    - ``open("ego4d", root=SRC)``: the native download at ``SRC``, prepared once into the cache
      (``cache`` or ``$MMLOADER_CACHE_DIR/stores``); prepared again when the source changes.
    - ``open("sample:ego4d", videos=8, seconds=60, seed=0)``: the built-in sample, generated once.

    ``storage_options`` configure the store's filesystem (fsspec), e.g. ``{"client_kwargs": {"endpoint_url": ...}}``
    for an S3-compatible server; they travel with the dataset into loader workers.

    Several processes opening the same name at once (torchrun ranks, SLURM tasks, two shells) prepare it once per
    folder: one process prepares under a lock while the others wait, then all open it; ranks whose cache folders
    are node-local (another disk, another ``$MMLOADER_CACHE_DIR``) each get one copy per folder
    (:func:`mmloader.coordinate.prepare_once`; waits end after ``$MMLOADER_PREPARE_TIMEOUT_S`` with
    ``PrepareTimeoutError`` naming the folder).
    """
    name = os.fspath(name_or_url)
    if name.startswith("sample:"):
        return _open_sample(name.split(":", 1)[1], cache=cache, progress=progress, **options)
    if root is None:
        if name in available() and not _looks_like_path(name):
            raise ValueError(f"mmloader.open({name!r}) needs root=<folder of the native {name} data>")
        return Dataset(Store(name, **(storage_options or {})))
    adapter = get_adapter(name)
    base = os.fspath(cache) if cache is not None else str(cache_dir() / "stores")
    dst = _prepared_url(adapter, name, root, base, options)
    prepare_once(dst, lambda: _is_store(dst),
                 lambda: adapter.prepare(os.fspath(root), dst, overwrite=True, progress=progress, **options),
                 what=f"the {name} store of {os.fspath(root)}", progress=progress)
    return Dataset(Store(dst))


def _prepared_url(adapter: Any, name: str, root: str | os.PathLike, base: str, options: dict[str, Any]) -> str:
    """Where ``open(name, root=...)`` keeps the store prepared from ``root`` with ``options``: one folder per
    source fingerprint and options."""
    fingerprint = adapter.fingerprint(os.fspath(root))
    if options:  # the same source prepared with other options is another store
        key = json.dumps(options, sort_keys=True, default=str)
        fingerprint += "-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    return join(base, f"{name}-{fingerprint}")


def _looks_like_path(name: str) -> bool:
    return "/" in name or "://" in name or os.path.exists(name)


def _open_sample(dataset: str, cache: str | os.PathLike | None, progress: bool, **options: Any) -> Dataset:
    """The built-in sample: generated (``src/``) and prepared (``stores/``) once into one folder per parameter set,
    by one process at a time (:func:`mmloader.coordinate.prepare_once`, its lock inside that folder)."""
    if dataset != "ego4d":
        raise ValueError(f"no built-in sample for {dataset!r} (available: ego4d)")
    params = {"videos": 8, "seconds": 60.0, "seed": 0, **options}
    key = "-".join(f"{k}{params[k]}" for k in sorted(params))
    base = os.fspath(cache) if cache is not None else str(cache_dir() / "samples")
    folder = os.path.join(base, f"ego4d-{key}")
    src, stores = os.path.join(folder, "src"), os.path.join(folder, "stores")
    adapter = get_adapter("ego4d")

    def store_url() -> str | None:
        """The prepared store's URL, None while the sample is not generated and prepared."""
        if not os.path.exists(os.path.join(src, "DONE")):
            return None
        dst = _prepared_url(adapter, "ego4d", src, stores, {})
        return dst if _is_store(dst) else None

    def prepare() -> None:
        if not os.path.exists(os.path.join(src, "DONE")):
            _generate_sample(src, params, progress)
        adapter.prepare(src, _prepared_url(adapter, "ego4d", src, stores, {}), overwrite=True, progress=progress)

    os.makedirs(folder, exist_ok=True)
    prepare_once(folder, lambda: store_url() is not None, prepare, what=f"the ego4d sample {params}",
                 lock=os.path.join(folder, ".prepare.lock"), progress=progress)
    return Dataset(Store(store_url()))


def _generate_sample(src: str, params: dict[str, Any], progress: bool) -> None:
    """Generate the sample tree into ``src`` (a temporary sibling renamed into place, ``DONE`` written last)."""
    from .samples.ego4d import generate_ego4d_sample

    parent, name = os.path.split(src)
    for entry in os.listdir(parent):   # a killed generator's leftovers (the caller holds the folder's lock)
        if entry.startswith(f"{name}.partial-"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    tmp = f"{src}.partial-{os.getpid()}"
    generate_ego4d_sample(tmp, progress=progress, **params)
    with builtins.open(os.path.join(tmp, "DONE"), "w") as f:
        json.dump(params, f)
    if os.path.exists(src):
        shutil.rmtree(src)
    os.rename(tmp, src)
