"""Window cache: the first (filling) epoch vs the cached epoch, same run. Prints JSON.

    python benchmarks/cache.py [--videos 8 --seconds 60 --sec 5 --stride 1 --frames 4 --size 112 112
                                --batch-size 8 --workers 0 2 --shard-size 32] [--smoke]

On IMU + video windows of the generated Ego4D sample (in a temp dir), for each worker count and a fresh,
empty cache: one shuffled epoch without the cache (reference), the first epoch through the cache
(``fill="lazy"``: it reads from the store and writes the cache), then a second epoch served from the cache.
Each epoch includes starting its worker processes (the loader starts them per epoch). Also times an eager
build (``wins.cache(fill="eager")``, as ``mmloader cache build``) and checks that a cached batch is
bit-identical to the uncached one. ``speedup`` = cached epoch windows/s ÷ first epoch windows/s.

Output keys: machine, setup, runs (one per worker count), eager_build, cached_batch_bit_identical.
"""

from __future__ import annotations

import os

import torch

import mmloader
from common import (Timer, add_sample_args, emit, machine, parse_args, parser, rate, sample_params, sample_store,
                    workdir)

SMOKE = dict(videos=2, seconds=10.0, video_size=[64, 48], video_fps=10.0, sec=1.0, stride=1.0, frames=1, size=[32, 32],
             batch_size=4, workers=[0], shard_size=4)


def time_epoch(ws, workers: int, batch_size: int, seed: int, epoch: int) -> dict:
    loader = ws.loader(batch_size=batch_size, shuffle=True, seed=seed, num_workers=workers)
    loader.set_epoch(epoch)
    n = 0
    with Timer() as t:
        for batch in loader:
            n += len(batch["index"])
    return rate(n, t.seconds)


def same_batch(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        (a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]))
        if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def run_workers(ws, w: int, args, tmp: str) -> dict:
    """One worker count: uncached epoch, first (filling) cached epoch, second cached epoch."""
    cached = ws.cache(os.path.join(tmp, f"cache-w{w}"), fill="lazy", shard_size=args.shard_size)
    uncached = time_epoch(ws, w, args.batch_size, args.seed, epoch=0)
    first = time_epoch(cached, w, args.batch_size, args.seed, epoch=0)
    cached_epoch = time_epoch(cached, w, args.batch_size, args.seed, epoch=1)
    status = cached.window_cache.status(verify=False)
    return {
        "workers": w,
        "uncached_epoch": uncached,
        "first_epoch_filling": first,
        "cached_epoch": cached_epoch,
        "speedup_cached_vs_first": round(cached_epoch["windows_per_s"] / max(first["windows_per_s"], 1e-9), 1),
        "speedup_cached_vs_uncached": round(cached_epoch["windows_per_s"] / max(uncached["windows_per_s"], 1e-9), 1),
        "shards_complete": f"{status['shards_complete']}/{status['shards_total']}",
        "cache_mb": round(status["bytes"] / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    add_sample_args(p, videos=8, seconds=60.0)
    p.add_argument("--sec", type=float, default=5.0, help="window length")
    p.add_argument("--stride", type=float, default=1.0, help="window stride")
    p.add_argument("--frames", type=int, default=4, help="frames per window")
    p.add_argument("--size", type=int, nargs=2, default=[112, 112], metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--backend", default="auto", help="video backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="an existing store; default: generate the sample in a temp dir")
    args = parse_args(p, SMOKE, argv)

    with workdir() as work:
        ds = mmloader.open(args.data or sample_store(work, **sample_params(args)))
        ws = ds.windows(sec=args.sec, stride=args.stride, modalities=["imu", "video"], frames=args.frames,
                        size=tuple(args.size), video_backend=args.backend)
        setup = {**vars(args), "windows": len(ws), "video_backend": ws.video_backend}
        result: dict = {"machine": machine(), "setup": setup,
                        "runs": [run_workers(ws, w, args, str(work)) for w in args.workers]}
        with Timer() as t:
            eager = ws.cache(str(work / "cache-eager"), fill="eager", progress=False, shard_size=args.shard_size)
        result["eager_build"] = rate(len(ws), t.seconds)
        batch = next(iter(eager.loader(batch_size=args.batch_size, shuffle=True, seed=args.seed)))
        reference = next(iter(ws.loader(batch_size=args.batch_size, shuffle=True, seed=args.seed)))
        result["cached_batch_bit_identical"] = same_batch(batch, reference)
    emit(result)


if __name__ == "__main__":
    main()
