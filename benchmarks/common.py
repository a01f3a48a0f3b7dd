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
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

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


def reused_dir(path: str | os.PathLike | None, name: str) -> Path:
    """``path``, or ``<the system temp dir>/<name>`` when it is None: created if missing and kept afterwards, so
    that what a benchmark generated there (see ``built_once``) is reused by its next run."""
    out = Path(path) if path is not None else Path(tempfile.gettempdir()) / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def built_once(path: Path, build: Callable[[Path], object]) -> Path:
    """``path``, made by ``build(path)`` unless a complete one is already there (a ``<path>.DONE`` marker beside it,
    written after ``build`` returns); a partial one left by an interrupted run is removed and built afresh."""
    marker = path.with_name(path.name + ".DONE")
    if not marker.exists():
        shutil.rmtree(path, ignore_errors=True)
        build(path)
        marker.write_text("complete\n")
    return path


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


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall clock, ``time.perf_counter``)."""

    seconds: float = 0.0

    def __enter__(self) -> "Timer":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0


def best(fn: Callable[[], object], repeat: int) -> float:
    """The shortest of ``repeat`` wall-clock runs of ``fn()``, in seconds."""
    times = []
    for _ in range(max(1, repeat)):
        with Timer() as t:
            fn()
        times.append(t.seconds)
    return min(times)


def rate(n: int, seconds: float, unit: str = "windows", digits: int = 3, rate_digits: int = 1) -> dict[str, Any]:
    """``{unit: n, "seconds": s, "<unit>_per_s": n / s}``, rounded (a zero duration counts as 1 ns)."""
    return {unit: n, "seconds": round(seconds, digits), f"{unit}_per_s": round(n / max(seconds, 1e-9), rate_digits)}


def ratio(value: float, bound: float | None, digits: int = 3) -> float | None:
    """``value / bound`` rounded, or None without a (positive) bound."""
    return round(value / bound, digits) if bound else None


class Progress:
    """``log("...")`` writes one line to stderr, prefixed with the seconds since this object was made."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self._t0:7.1f} s] {msg}", file=sys.stderr, flush=True)


# -- reporting ---------------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Where the numbers were measured: CPUs, Python, platform, mmloader, and torch/CUDA when torch is loaded."""
    import mmloader

    out: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "processor": platform.processor(), "platform": platform.platform(),
                           "mmloader": mmloader.__version__}
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch"] = torch.__version__
        out["torch_threads"] = torch.get_num_threads()
        out["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return out


def emit(result: dict[str, Any]) -> None:
    """Print ``result`` as one JSON object on stdout (the benchmark's whole output there)."""
    print(json.dumps(result, indent=1))
