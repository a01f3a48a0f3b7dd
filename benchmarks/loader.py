"""Loader throughput vs the bare decoder on exactly the same frames. Prints JSON.

    python benchmarks/loader.py [--videos 8 --seconds 60 --sec 5 --stride 1 --frames 4 --size 112 112
                                 --workers 0 1 2 --backends pyav decord] [--smoke]

For IMU-only and IMU+video windows it times a shuffled epoch of ``WindowSet.loader`` at each worker count
(after one warm-up epoch, so worker start-up is excluded), and, in the same run and for each backend,
the bare decoder (one reader per video, no alignment, no pipeline) decoding exactly the frames those
windows select, in the same order. ``ratio`` = loader frames/s ÷ bare decoder frames/s. Backends that cannot
decode on this machine (``mmloader.video.backends.backend_problems``) are skipped and listed with the reason.

Output keys: machine, setup, imu_only, imu_video (per backend: windows, bare_decoder, loader), skipped_backends.
"""

from __future__ import annotations

import mmloader
from common import (Timer, add_sample_args, emit, machine, parse_args, parser, rate, sample_params, sample_store,
                    workdir)
from mmloader.video import open_reader
from mmloader.video.backends import backend_problems
from mmloader.video.probe import media_url

SMOKE = dict(videos=2, seconds=10.0, video_size=[64, 48], video_fps=10.0, sec=1.0, stride=1.0, frames=1, size=[32, 32],
             batch_size=4, workers=[0])


def time_loader(ws, workers: int, batch_size: int, seed: int) -> dict:
    loader = ws.loader(batch_size=batch_size, shuffle=True, seed=seed, num_workers=workers)
    for _ in loader:  # warm-up epoch: worker start-up, file handles, page cache
        pass
    n = 0
    with Timer() as t:
        for batch in loader:
            n += len(batch["index"])
    return {"workers": workers, **rate(n, t.seconds)}


def time_bare_decoder(ws, seed: int, batch_size: int) -> dict:
    """Decode the frames of every window, in the loader's order, straight from the backend."""
    order = ws.loader(batch_size=batch_size, shuffle=True, seed=seed).order(1)
    cols = ws._columns
    store = ws.store
    readers = {}
    frames = 0
    with Timer() as t:
        for i in order:
            rid = cols.recording_id[i]
            if rid not in readers:
                pts, key = store.video_index(rid, "video")
                uri = media_url(store.url, store.stream_row(rid, "video")["uri"])
                readers[rid] = open_reader(ws.spec.video_backend, uri, pts, key, ws.spec.size)
            frames += len(readers[rid].get_frames(cols.video_idx["video"][i]))
    for r in readers.values():
        r.close()
    return rate(frames, t.seconds, unit="frames")


def imu_video(ds, backend: str, args) -> dict:
    """One backend: the bare decoder, then the loader at each worker count, on the same windows."""
    av = ds.windows(sec=args.sec, stride=args.stride, modalities=["imu", "video"], frames=args.frames,
                    size=tuple(args.size), video_backend=backend)
    bare = time_bare_decoder(av, args.seed, args.batch_size)
    runs = []
    for w in args.workers:
        r = time_loader(av, w, args.batch_size, args.seed)
        r["frames_per_s"] = round(r["windows_per_s"] * args.frames, 1)
        r["ratio_to_bare_decoder"] = round(r["frames_per_s"] / max(bare["frames_per_s"], 1e-9), 3)
        runs.append(r)
    return {"windows": len(av), "bare_decoder": bare, "loader": runs}


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    add_sample_args(p, videos=8, seconds=60.0)
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
    args = parse_args(p, SMOKE, argv)

    with workdir() as work:
        ds = mmloader.open(args.data or sample_store(work, **sample_params(args)))
        imu = ds.windows(sec=args.sec, stride=args.stride, modalities=["imu"])
        result = {"machine": machine(), "setup": {**vars(args), "imu_windows": len(imu)},
                  "imu_only": [time_loader(imu, w, args.batch_size, args.seed) for w in args.workers],
                  "imu_video": {}, "skipped_backends": {}}
        for backend in args.backends or ("pyav", "decord", "torchcodec"):
            why = backend_problems([backend])[backend]
            if why is not None:  # e.g. torchcodec without FFmpeg's shared libraries
                result["skipped_backends"][backend] = why
            else:
                result["imu_video"][backend] = imu_video(ds, backend, args)
    emit(result)


if __name__ == "__main__":
    main()
