"""The benchmark's measurements on one window set: the sequential bound, loader passes, the window cache's first
epoch and ``cache build``, and a description of the video measured. Rates are windows per second of wall clock
(``time.perf_counter``); every ``ratio`` is a rate ÷ the bound's windows/s."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..fsutil import get_fs, is_local
from ..video.probe import media_storage_options, media_url, open_remote
from .util import Timer, rate, ratio

Log = Callable[[str], None]
ORDERS = {"ordered": False, "shuffled": True}
NS = 1_000_000_000


# -- the media the windows reference ---------------------------------------------------------------------------------


def referenced_recordings(ws: Any) -> list[str]:
    """Ids of the recordings the windows of ``ws`` come from, in order of first appearance in the index."""
    rids = ws.index["recording_id"].to_pylist()
    return list(dict.fromkeys(rids))


def media_of(ds: Any, stream: str, rids: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(URL, fsspec options) of the media file of ``stream`` for each of ``rids`` (as the window set reads them)."""
    out = []
    for rid in rids:
        url = media_url(ds.store.url, ds.store.stream_row(rid, stream)["uri"])
        out.append((url, media_storage_options(ds.store.url, url, ds.store.storage_options)))
    return out


@contextlib.contextmanager
def open_media(url: str, options: dict[str, Any]) -> Iterator[Any]:
    """A PyAV input container of a local or remote (fsspec) media file."""
    import av

    fs, path = get_fs(url, **options)
    f = None if is_local(fs) else open_remote(fs, path)
    try:
        with av.open(path if f is None else f) as container:
            yield container
    finally:
        if f is not None:
            f.close()


def _media_bytes(url: str, options: dict[str, Any]) -> int:
    fs, path = get_fs(url, **options)
    return int(fs.size(path))


def describe_video(ds: Any, ws: Any, stream: str, media: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """What was measured, from the store and the files: backend, codec, resolution ([W, H] px), fps, the keyframe
    interval (frames; ``gop`` = its median, ``measured_keyframe_interval`` its mean) on the store's video index,
    videos, seconds per video (mean), frames, and the mean bitrate (Mbit/s)."""
    rids = referenced_recordings(ws)
    intervals: list[int] = []
    frames, seconds, steps = 0, 0.0, []
    for rid in rids:
        pts, key = ds.store.video_index(rid, stream)
        pts = np.asarray(pts, dtype=np.int64)
        kf = np.flatnonzero(np.asarray(key))
        intervals.extend(np.diff(kf).tolist())
        if len(pts) > 1:
            step = float(np.median(np.diff(pts)))
            steps.append(step)
            seconds += (pts[-1] - pts[0] + step) / NS
        frames += len(pts)
    with open_media(*media[0]) as c:
        s = c.streams.video[0]
        codec, width, height = s.codec_context.name, s.codec_context.width, s.codec_context.height
    total_bytes = sum(_media_bytes(url, opts) for url, opts in media)
    return {"backend": ws.video_backend, "stream": stream, "codec": codec, "resolution": [width, height],
            "fps": round(NS / float(np.median(steps)), 3) if steps else None,
            "gop": int(round(float(np.median(intervals)))) if intervals else None,
            "measured_keyframe_interval": round(float(np.mean(intervals)), 1) if intervals else None,
            "max_keyframe_interval": int(max(intervals)) if intervals else None,
            "videos": len(rids), "seconds_per_video": round(seconds / max(len(rids), 1), 3), "frames": frames,
            "mbit_per_s": round(total_bytes * 8 / max(seconds, 1e-9) / 1e6, 2)}


# -- measurements ----------------------------------------------------------------------------------------------------


def sequential_bound(media: list[tuple[str, dict[str, Any]]], n_windows: int) -> dict[str, Any]:
    """Every frame of every file in ``media`` decoded once, in order (PyAV, thread_type AUTO, frames not
    converted): frames/s, and windows/s = ``n_windows`` ÷ that time."""
    frames = 0
    with Timer() as t:
        for url, options in media:
            with open_media(url, options) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for _ in container.decode(stream):
                    frames += 1
    out = rate(frames, t.seconds, unit="frames")
    out["windows"] = n_windows
    out["windows_per_s"] = round(n_windows / max(t.seconds, 1e-9), 3)
    return out


def time_pass(ws: Any, *, workers: int, shuffle: bool, batch_size: int, seed: int,
              max_batches: int | None) -> dict[str, Any]:
    """Windows/s of a fresh loader's first ``max_batches`` batches (all when None), start-up included
    (``first_batch_s``: seconds to the first batch)."""
    loader = ws.loader(batch_size=batch_size, shuffle=shuffle, seed=seed, num_workers=workers)
    todo = len(loader) if max_batches is None else min(max_batches, len(loader))
    n, first = 0, None
    it = iter(loader)
    t0 = time.perf_counter()
    for _ in range(todo):
        n += len(next(it)["index"])
        if first is None:
            first = time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    it.close()
    loader.close()
    out = {"workers": workers, "shuffle": shuffle, "batches": todo, **rate(n, seconds, rate_digits=3)}
    out["first_batch_s"] = round(first or 0.0, 3)
    return out


def max_batches(args: argparse.Namespace) -> int | None:
    """The loader batches ``--max-windows`` allows (None: all)."""
    return None if args.max_windows is None else -(-args.max_windows // args.batch_size)


def timed(ws: Any, args: argparse.Namespace, bound: float | None, log: Log, label: str, *, workers: int,
          shuffle: bool) -> dict[str, Any]:
    """``time_pass`` of ``ws`` with the run's batch size, seed and ``--max-windows``, plus its ratio; logged."""
    log(f"{label}: {'shuffled' if shuffle else 'ordered'}, {workers} workers")
    r = time_pass(ws, workers=workers, shuffle=shuffle, batch_size=args.batch_size, seed=args.seed,
                  max_batches=max_batches(args))
    r["ratio"] = ratio(r["windows_per_s"], bound)
    log(f"  {r['windows_per_s']} windows/s, ratio {r['ratio']}")
    return r


def loader_cases(ws: Any, args: argparse.Namespace, bound: float | None, log: Log) -> list[dict[str, Any]]:
    """A fresh loader per order in ``args.orders`` and worker count in ``args.workers``."""
    return [timed(ws, args, bound, log, "loader", workers=w, shuffle=ORDERS[order])
            for order in args.orders for w in args.workers]


def cache_first_epochs(sub: Any, args: argparse.Namespace, bound: float | None, tmp: Path,
                       log: Log) -> list[dict[str, Any]]:
    """The window cache's first (filling) epoch of ``sub``, in index order, per worker count in
    ``args.cache_workers``, each on an empty cache under ``tmp``."""
    runs = []
    for w in args.cache_workers:
        log(f"cache: first (filling) epoch, index order, {w} workers")
        cached = sub.cache(str(tmp / f"lazy-w{w}"), fill="lazy", progress=False, shard_size=args.shard_size)
        r = time_pass(cached, workers=w, shuffle=False, batch_size=args.batch_size, seed=args.seed, max_batches=None)
        status = cached.window_cache.status(verify=False)
        r["shards_complete"] = f"{status['shards_complete']}/{status['shards_total']}"
        r["ratio"] = ratio(r["windows_per_s"], bound)
        log(f"  {r['windows_per_s']} windows/s, ratio {r['ratio']}")
        runs.append(r)
    return runs


def cache_build(sub: Any, args: argparse.Namespace, bound: float | None, tmp: Path,
                log: Log) -> list[dict[str, Any]]:
    """``mmloader cache build --workers W`` (``mmloader.loader.fill_cache``) of ``sub`` on an empty cache under
    ``tmp``, per worker count W in ``args.cache_workers``."""
    from ..loader import fill_cache

    runs = []
    for w in args.cache_workers:
        log(f"cache build, {w} workers")
        with Timer() as t:
            cached = sub.cache(str(tmp / f"build-w{w}"), fill="lazy", progress=False, shard_size=args.shard_size)
            counts = fill_cache(cached, num_workers=w, progress=False)
        r = {"workers": w, **rate(len(sub), t.seconds, rate_digits=3), "filled_by_workers": counts["filled_by_workers"]}
        r["ratio"] = ratio(r["windows_per_s"], bound)
        log(f"  {r['windows_per_s']} windows/s, ratio {r['ratio']}")
        runs.append(r)
    return runs


def profile_case(ws_profile: Any, ws: Any, args: argparse.Namespace, bound: float | None,
                 original_shuffled: dict[str, Any] | None, log: Log) -> dict[str, Any]:
    """The loader at 0 workers, in index order and shuffled, on the profile store's windows ``ws_profile``, and
    ``shuffled_gain`` = its shuffled windows/s ÷ the original store's (``original_shuffled``, timed here when
    None). Ratios are to the bound of the original files."""
    out: dict[str, Any] = {"windows": len(ws_profile)}
    out["ordered"] = timed(ws_profile, args, bound, log, "profile loader", workers=0, shuffle=False)
    out["shuffled"] = timed(ws_profile, args, bound, log, "profile loader", workers=0, shuffle=True)
    if original_shuffled is None:
        original_shuffled = timed(ws, args, bound, log, "loader (original files, for the gain)", workers=0,
                                  shuffle=True)
        out["original_shuffled"] = original_shuffled
    out["shuffled_gain"] = ratio(out["shuffled"]["windows_per_s"], original_shuffled["windows_per_s"], digits=2)
    log(f"  shuffled gain over the original files: {out['shuffled_gain']}x")
    return out
