"""Ego4D-like video: the first pass over long-GOP 1080p H.264 against the decoder's sequential bound. Prints JSON.

    python benchmarks/video.py [--videos 2 --seconds 90 --video-size 1920 1080 --fps 30 --gop 250
                                --preset veryfast --crf 19 --grain 6 --sec 5 --stride 1 --frames 4 --size 224 224
                                --batch-size 8 --workers 0 1 2 --orders ordered shuffled --cache-workers 0
                                --max-windows K --only bound,loader,cache,build,profile,embed --backend auto
                                --profile 224-gop10 --embed-model imu2clip-tiny --output FILE
                                --work DIR | --fresh] [--smoke]

``mmloader bench --synthetic`` (``mmloader.bench``: the generated data, the cases, the JSON; see ``mmloader bench
--help`` and docs/windows.md) plus one case that lives above mmloader, in the IMU2CLIP plugin:

- ``embed``: ``imu2clip embed``'s ``EmbeddedWindows`` (frozen CLIP towers, ``--embed-model``, default the plugin's
  offline ``imu2clip-tiny`` with random weights, on the CPU) over the same windows in index order at 0 workers,
  blocks of one batch: windows/s and its ratio to the bound. Runs by default when open_clip is installed.

Generates once, with PyAV, ``--videos`` H.264 files (libx264, a fixed GOP of ``--gop`` frames) of ``--seconds`` s
at ``--fps`` with matching 200 Hz IMU in the Ego4D layout, kept under ``--work`` (default
``<temp dir>/mmloader-bench-video``) and reused by the next run with the same parameters; ``--fresh`` uses a
throwaway temp dir. Cases: ``bound`` (every frame decoded once, in order, PyAV with threads), ``loader`` (each
order × worker count), ``cache`` (the window cache's first epoch), ``build`` (``cache build``), ``profile`` (the
shuffled and ordered loader on a store prepared with ``--profile``, when the Ego4D recipe has transcode profiles;
``profile_shuffled_gain``), ``embed``.

Output keys: machine, video, setup, windows, bound, loader, cache_first_epoch, cache_build, notes, ratios (case →
ratio to the bound), and profile / profile_shuffled_gain / embed when they ran.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any, Callable

from mmloader.bench import BenchError, add_arguments, finish, resolve_args, run_bench
from mmloader.bench.measure import timed
from mmloader.bench.util import Progress


def embed_case(ws: Any, args: argparse.Namespace, bound: float | None, log: Callable[[str], None]) -> dict:
    """``EmbeddedWindows(ws, towers)`` read in index order by a 0-worker loader: windows/s and ratio."""
    import torch

    from imu2clip_plugin.embed import EmbeddedWindows
    from imu2clip_plugin.towers import ClipTowers

    torch.manual_seed(args.seed)
    towers = ClipTowers(args.embed_model, device="cpu")
    emb = EmbeddedWindows(ws, towers, reduce="center", block_size=args.batch_size)
    r = timed(emb, args, bound, log, f"embed ({args.embed_model}, cpu)", workers=0, shuffle=False)
    return {"model": args.embed_model, "device": "cpu", **r,
            "label": f"imu2clip embed ({args.embed_model}, cpu), 0 workers"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, store=False, extra_cases=("embed",))
    p.add_argument("--embed-model", default="imu2clip-tiny", help="open_clip model of the embed case")
    args = p.parse_args(argv)
    have_clip = importlib.util.find_spec("open_clip") is not None
    try:
        resolve_args(args, extra_cases={"embed": have_clip})
    except BenchError as e:
        p.error(str(e))
    if "embed" in args.cases and not have_clip:
        p.error("the embed case needs open_clip (pip install open_clip_torch)")
    result = run_bench(args, Progress(), extra={"embed": embed_case})
    if not have_clip:
        result["notes"].append("embed: skipped, open_clip is not installed")
    finish(result, args.output)


if __name__ == "__main__":
    main()
