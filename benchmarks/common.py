"""What every benchmark shares: arguments with a ``--smoke`` mode, a work directory, the sample store, timing,
a description of the machine, and printing the result as one JSON object.

Each benchmark runs as a script (``python benchmarks/<name>.py``), so this module is imported as ``common``
(the script's own directory is first on ``sys.path``). ``--smoke`` swaps the defaults for tiny ones, so that a
run takes seconds (``tests/test_benchmarks.py`` runs every benchmark so); explicit arguments still win.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

# timing, rates, progress lines, the machine, folders built once: shared with ``mmloader bench``
from mmloader.bench.util import Progress, Timer, built_once, machine, rate, ratio, reused_dir  # noqa: F401

# -- arguments ------------------------------------------------------------------------------------------------------


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose ``--help`` shows the benchmark's module docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def parse_args(p: argparse.ArgumentParser, smoke: dict[str, Any], argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with a ``--smoke`` flag added: given, ``smoke`` (dest → value) replaces the defaults."""
    p.add_argument("--smoke", action="store_true",
                   help="tiny defaults that run in seconds (a check that the benchmark works, not a measurement): "
                        + ", ".join(f"{k}={v}" for k, v in smoke.items()))
    known, _ = p.parse_known_args(argv)
    if known.smoke:
        p.set_defaults(**smoke)
    return p.parse_args(argv)


@contextlib.contextmanager
def workdir(path: str | os.PathLike | None = None, prefix: str = "mmloader-bench-") -> Iterator[Path]:
    """``path`` (created, kept afterwards) or a temporary directory removed at exit."""
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    tmp = tempfile.mkdtemp(prefix=prefix)
    try:
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- the sample store ------------------------------------------------------------------------------------------------


def sample_source(work: Path, videos: int, seconds: float, seed: int = 0, defect_fraction: float = 0.3,
                  fps: float = 30.0, size: tuple[int, int] = (160, 120)) -> Path:
    """The generated Ego4D sample (``seconds`` per video, ``fps`` frames/s, ``size`` = (W, H) px) under ``work``,
    reused when a complete one with these parameters is already there. The defaults are the generator's."""
    from mmloader.samples import generate_ego4d_sample

    name = f"ego4d-v{videos}-s{seconds:g}-seed{seed}-d{defect_fraction:g}-fps{fps:g}-{size[0]}x{size[1]}"
    root = work / name
    if not (root / "DONE").exists():
        shutil.rmtree(root, ignore_errors=True)
        generate_ego4d_sample(root, videos=videos, seconds=seconds, seed=seed, defect_fraction=defect_fraction,
                              fps=fps, size=tuple(size), progress=False)
        (root / "DONE").write_text("complete\n")
    return root


def sample_store(work: Path, videos: int, seconds: float, **params: Any) -> str:
    """``sample_source(work, videos, seconds, **params)`` prepared by the Ego4D recipe (once) into ``work``;
    returns the store's path."""
    from mmloader.recipes.ego4d.recipe import Ego4DAdapter

    root = sample_source(work, videos, seconds, **params)
    store = work / (root.name + "-store")
    if not (work / (root.name + "-store.DONE")).exists():
        Ego4DAdapter().prepare(str(root), str(store), progress=False, overwrite=store.exists())
        (work / (root.name + "-store.DONE")).write_text("complete\n")
    return str(store)


def add_sample_args(p: argparse.ArgumentParser, videos: int, seconds: float, **defaults: Any) -> None:
    """``--videos``, ``--seconds`` (per video, >= 10), ``--video-size W H`` (px), ``--video-fps`` of the sample;
    ``defaults`` (dest → value, e.g. ``video_size=[64, 48]``) replace the generator's own."""
    p.add_argument("--videos", type=int, default=videos, help="sample videos (>= 2)")
    p.add_argument("--seconds", type=float, default=seconds, help="seconds per sample video (>= 10)")
    p.add_argument("--video-size", type=int, nargs=2, default=[160, 120], metavar=("W", "H"),
                   help="generated videos' width and height (px)")
    p.add_argument("--video-fps", type=float, default=30.0, help="generated videos' frame rate")
    p.set_defaults(**defaults)


def sample_params(args: argparse.Namespace) -> dict[str, Any]:
    """The ``add_sample_args`` options as ``sample_source``/``sample_store`` keyword arguments."""
    return {"videos": args.videos, "seconds": args.seconds, "size": tuple(args.video_size), "fps": args.video_fps}


# -- timing ------------------------------------------------------------------------------------------------------------


def best(fn: Callable[[], object], repeat: int) -> float:
    """The shortest of ``repeat`` wall-clock runs of ``fn()``, in seconds."""
    times = []
    for _ in range(max(1, repeat)):
        with Timer() as t:
            fn()
        times.append(t.seconds)
    return min(times)


# -- reporting ---------------------------------------------------------------------------------------------------------


def emit(result: dict[str, Any]) -> None:
    """Print ``result`` as one JSON object on stdout (the benchmark's whole output there)."""
    print(json.dumps(result, indent=1))
