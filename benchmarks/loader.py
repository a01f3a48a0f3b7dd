"""Loader throughput vs the bare decoder on exactly the same frames. Prints JSON.

    python benchmarks/loader.py [--videos 8 --seconds 60 --sec 5 --stride 1 --frames 4 --size 112 112
                                 --workers 0 1 2 --backends pyav decord]

For IMU-only and IMU+video windows it times a shuffled epoch of ``WindowSet.loader`` at each worker count
(after one warm-up epoch, so worker start-up is excluded), and, in the same run and for each backend,
the bare decoder (one reader per video, no alignment, no pipeline) decoding exactly the frames those
windows select, in the same order. ``ratio`` = loader frames/s ÷ bare decoder frames/s. Backends that cannot
decode on this machine (``mmloader.video.backends.backend_problems``) are skipped and listed with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

import mmloader
from mmloader.video.probe import media_url
from mmloader.video import open_reader
from mmloader.video.backends import backend_problems


def time_loader(ws, workers: int, batch_size: int, seed: int) -> dict:
    loader = ws.loader(batch_size=batch_size, shuffle=True, seed=seed, num_workers=workers)
    for _ in loader:  # warm-up epoch: worker start-up, file handles, page cache
        pass
    t = time.perf_counter()
    n = 0
    for batch in loader:
        n += len(batch["index"])
    dt = time.perf_counter() - t
    return {"workers": workers, "windows": n, "seconds": round(dt, 3), "windows_per_s": round(n / dt, 1)}


def time_bare_decoder(ws, seed: int, batch_size: int) -> dict:
    """Decode the frames of every window, in the loader's order, straight from the backend."""
    order = ws.loader(batch_size=batch_size, shuffle=True, seed=seed).order(1)
    cols = ws._columns
    store = ws.store
    readers = {}
    t = time.perf_counter()
    frames = 0
    for i in order:
        rid = cols.recording_id[i]
        if rid not in readers:
            pts, key = store.video_index(rid, "video")
            readers[rid] = open_reader(ws.spec.video_backend, media_url(store.url, store.stream_row(rid, "video")["uri"]), pts, key,
                                       ws.spec.size)
        frames += len(readers[rid].get_frames(cols.video_idx["video"][i]))
    dt = time.perf_counter() - t
    for r in readers.values():
        r.close()
    return {"frames": frames, "seconds": round(dt, 3), "frames_per_s": round(frames / dt, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--sec", type=float, default=5.0, help="window length")
    p.add_argument("--stride", type=float, default=1.0, help="window stride")
    p.add_argument("--frames", type=int, default=4, help="frames per window")
    p.add_argument("--size", type=int, nargs=2, default=[112, 112], metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--backends", nargs="+", default=None,
                   help="default: all three; one that cannot decode here is skipped (reported, with the reason)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="an existing store; default: generate the sample in a temp dir")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            ds = mmloader.open(args.data)
        else:
            ds = mmloader.open("sample:ego4d", videos=args.videos, seconds=args.seconds, cache=tmp, progress=False)
        imu = ds.windows(sec=args.sec, stride=args.stride, modalities=["imu"])
        result = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "processor": platform.processor()},
            "setup": {**vars(args), "imu_windows": len(imu)},
            "imu_only": [time_loader(imu, w, args.batch_size, args.seed) for w in args.workers],
            "imu_video": {},
            "skipped_backends": {},
        }
        for backend in args.backends or ("pyav", "decord", "torchcodec"):
            why = backend_problems([backend])[backend]
            if why is not None:  # e.g. torchcodec without FFmpeg's shared libraries
                result["skipped_backends"][backend] = why
                continue
            av = ds.windows(sec=args.sec, stride=args.stride, modalities=["imu", "video"], frames=args.frames,
                            size=tuple(args.size), video_backend=backend)
            bare = time_bare_decoder(av, args.seed, args.batch_size)
            runs = []
            for w in args.workers:
                r = time_loader(av, w, args.batch_size, args.seed)
                r["frames_per_s"] = round(r["windows_per_s"] * args.frames, 1)
                r["ratio_to_bare_decoder"] = round(r["frames_per_s"] / bare["frames_per_s"], 3)
                runs.append(r)
            result["imu_video"][backend] = {"windows": len(av), "bare_decoder": bare, "loader": runs}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
