"""IMU at scale: thousands of recordings, IMU-only windows, side by side with a numpy gather from memory. JSON.

    python benchmarks/scale.py [--recordings 1000 --seconds 120 --hz 200 --channels 6 --sec 5 --stride 1
                                --batch-size 256 --workers 0 1 2 --epochs-rss 10 --max-windows K --seed 0
                                --shard-size N --only index,bound,ordered,shuffled,block,cache,rss --output FILE
                                --work DIR | --fresh] [--smoke]

The same as ``mmloader bench --scale`` (``mmloader.bench.scale``). Generates once, with ``mmloader.write_store``,
``--recordings`` x ``--seconds`` of ``--channels`` float32 IMU at ``--hz`` (regular timestamps), kept under
``--work`` (default ``<temp dir>/mmloader-bench-scale``, a folder per parameters) and reused by the next run
(``--fresh``: a throwaway temp dir; the default 1000 x 120 s store is ~700 MB). Cases:

- ``index``: ``windows(sec, stride, modalities=["imu"], imu_hz=hz)``: seconds, µs/window, RSS growth (MB; peak
  too), pickled bytes of the set. Always built.
- ``bound``: the same windows gathered from memory into ``(B, C, T)`` float32 batches, in each loader order.
- ``ordered`` / ``shuffled`` / ``block``: a fresh loader per ``--workers`` count: windows/s over an epoch (the first
  ceil(K / batch) batches with ``--max-windows K``), first-batch latency, ratio to the bound of the same order.
  ``block`` (``shuffle="block"``) is skipped with a note when the loader does not have it.
- ``cache``: IMU + a 512-float ``video_emb`` per window cached eagerly (build time), then a shuffled (and block)
  epoch over the cache at 0 workers.
- ``rss``: 2 persistent workers over ``--epochs-rss`` shuffled epochs: worker RSS per epoch, growth %.

Output keys: machine, setup, store, index, bound, loader, cache, rss, ratios (case → ratio to the bound), notes.
"""

from __future__ import annotations

import argparse

from mmloader.bench.run import BenchError
from mmloader.bench.scale import add_arguments, finish, resolve_args, run_scale
from mmloader.bench.util import Progress


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        resolve_args(args)
    except BenchError as e:
        p.error(str(e))
    finish(run_scale(args, Progress()), args.output)


if __name__ == "__main__":
    main()
