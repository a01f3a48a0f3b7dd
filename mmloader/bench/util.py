"""What the benchmarks share: timing, rates and ratios, progress lines on stderr, a description of the machine,
and folders built once and reused by later runs. ``benchmarks/common.py`` re-exports these."""

from __future__ import annotations

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


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall clock, ``time.perf_counter``)."""

    seconds: float = 0.0

    def __enter__(self) -> "Timer":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0


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


def machine() -> dict[str, Any]:
    """Where the numbers were measured: CPUs, Python, platform, mmloader, and torch/CUDA when torch is loaded."""
    from .._version import __version__

    out: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "processor": platform.processor(), "platform": platform.platform(),
                           "mmloader": __version__}
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch"] = torch.__version__
        out["torch_threads"] = torch.get_num_threads()
        out["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return out


def emit(result: dict[str, Any], output: str | None, table: str) -> None:
    """A benchmark's result: its JSON on stdout (and in the file ``output``), the human-readable ``table`` on
    stderr."""
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if output:
        Path(output).write_text(text + "\n")
    print(table, file=sys.stderr, flush=True)


@contextlib.contextmanager
def work_folder(path: str | os.PathLike | None, name: str, reuse: bool, prefix: str) -> Iterator[Path]:
    """``reused_dir(path, name)`` when ``reuse``; else a temporary folder (named ``prefix...``, inside ``path`` when
    given) removed at exit."""
    if reuse:
        yield reused_dir(path, name)
        return
    base = reused_dir(path, name) if path is not None else None
    with tempfile.TemporaryDirectory(prefix=prefix, dir=base) as tmp:
        yield Path(tmp)


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
