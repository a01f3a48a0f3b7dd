"""``mmloader bench``: its options, the cases run in order on one window set, the JSON result and the table.

``add_arguments`` adds the options (defaults None, filled by ``resolve_args``: the defaults, or the ``--smoke``
ones); ``run_bench`` generates or opens the store and runs the cases; ``finish`` prints the JSON on stdout (and
to ``--output``) and the table on stderr. ``extra`` cases (``benchmarks/video.py``'s ``embed``) are callables
``(windows, args, bound windows/s, log) -> dict with "windows_per_s" and "ratio"``.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..errors import MMLoaderError
from . import measure
from .measure import ORDERS
from .synthetic import profile_available, profile_digest, profile_store, source_and_store
from .util import Progress, emit, machine, work_folder

CASES = ("bound", "loader", "cache", "build", "profile")
DEFAULT_PROFILE = "224-gop10"
WORK_NAME = "mmloader-bench-video"
DEFAULTS: dict[str, Any] = dict(
    videos=2, seconds=90.0, video_size=[1920, 1080], fps=30.0, gop=250, preset="veryfast", crf=19.0, grain=6,
    seed=0, sec=5.0, stride=1.0, frames=4, size=[224, 224], batch_size=8, workers=[0, 1, 2],
    orders=["ordered", "shuffled"], cache_workers=[0], stream="video", backend="auto")
GENERATION = ("videos", "seconds", "video_size", "fps", "gop", "preset", "crf", "grain", "profile", "fresh")
SMOKE: dict[str, Any] = dict(videos=1, seconds=4.0, video_size=[320, 240], fps=30.0, gop=30, sec=1.0, stride=1.0,
                             frames=2, size=[64, 64], batch_size=2, workers=[0], cache_workers=[0])
Extra = Callable[[Any, argparse.Namespace, "float | None", Callable[[str], None]], dict]


class BenchError(Exception):
    """A benchmark that cannot run as asked (bad options, no such store, no video stream): one line."""


def _d(name: str, text: str) -> str:
    smoke = f"; --smoke: {SMOKE[name]}" if name in SMOKE else ""
    return f"{text} (default: {DEFAULTS[name]}{smoke})"


def add_arguments(p: argparse.ArgumentParser, store: bool = True, extra_cases: Sequence[str] = ()) -> None:
    """``mmloader bench``'s options on ``p``; ``store=False``: no STORE / ``--synthetic`` (always synthetic)."""
    if store:
        p.add_argument("store", nargs="?", default=None, help="a prepared store (path or URL) to benchmark")
        p.add_argument("--synthetic", action="store_true", help="generate Ego4D-like videos and IMU, prepare them "
                                                                "with the Ego4D recipe, and benchmark that store")
    g = p.add_argument_group("generated data (--synthetic)")
    g.add_argument("--videos", type=int, help=_d("videos", "videos"))
    g.add_argument("--seconds", type=float, help=_d("seconds", "seconds per video"))
    g.add_argument("--video-size", type=int, nargs=2, metavar=("W", "H"), help=_d("video_size", "video size, px"))
    g.add_argument("--fps", type=float, help=_d("fps", "frame rate"))
    g.add_argument("--gop", type=int, help=_d("gop", "frames between keyframes (x264's default keyint is 250)"))
    g.add_argument("--preset", help=_d("preset", "x264 preset"))
    g.add_argument("--crf", type=float, help=_d("crf", "x264 CRF (19 with --grain 6: ~9 Mbit/s at 1080p30)"))
    g.add_argument("--grain", type=int, help=_d("grain", "per-pixel sensor grain amplitude, levels"))
    g.add_argument("--seed", type=int, help=_d("seed", "generation and shuffling seed"))
    g.add_argument("--profile", default=None, help=f"transcode profile of the profile case (default: "
                                                   f"{DEFAULT_PROFILE})")
    g.add_argument("--work", default=None, help=f"where generated data is kept and reused (default: <temp dir>/"
                                                f"{WORK_NAME}); in STORE mode, where the caches are made")
    g.add_argument("--fresh", action="store_true", help="generate into a throwaway temp dir instead of --work")
    w = p.add_argument_group("windows and cases")
    w.add_argument("--sec", type=float, help=_d("sec", "window length, s"))
    w.add_argument("--stride", type=float, help=_d("stride", "window stride, s"))
    w.add_argument("--frames", type=int, help=_d("frames", "frames per window"))
    w.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help=_d("size", "frame size, px"))
    w.add_argument("--stream", help=_d("stream", "the video stream"))
    w.add_argument("--backend", help=_d("backend", "video backend of the windows"))
    w.add_argument("--batch-size", type=int, help=_d("batch_size", "loader batch size"))
    w.add_argument("--workers", type=int, nargs="+", help=_d("workers", "loader worker counts"))
    w.add_argument("--orders", nargs="+", choices=sorted(ORDERS), help=_d("orders", "loader orders"))
    w.add_argument("--cache-workers", type=int, nargs="+",
                   help=_d("cache_workers", "worker counts of the cache's first (filling) epoch and of cache build"))
    w.add_argument("--shard-size", type=int, default=None, help="window cache shard size (default: the cache's)")
    w.add_argument("--max-windows", type=int, default=None,
                   help="time only the first ceil(K / batch size) loader batches; cache the first K windows")
    w.add_argument("--only", default=None, help=f"comma-separated cases among {','.join(CASES + tuple(extra_cases))}"
                                                f" (default: all that apply)")
    p.add_argument("--output", default=None, help="also write the JSON result to this file")
    p.add_argument("--smoke", action="store_true", help="tiny defaults that run in seconds (a check that the "
                                                        "benchmark works, not a measurement)")
    if store:  # mmloader bench --scale: the IMU benchmark at scale (mmloader.bench.scale)
        from .scale import add_scale_options

        g = p.add_argument_group("IMU at scale (--scale)")
        g.add_argument("--scale", action="store_true", help="instead: IMU-only windows over a generated store of "
                       "many recordings (index, loader orders, window cache, worker RSS) beside a numpy gather "
                       "from memory; uses --seconds --seed --work --fresh --sec --stride --batch-size --workers "
                       "--shard-size --max-windows --only (cases: index,bound,ordered,shuffled,block,cache,rss) "
                       "with its own defaults (see benchmarks/scale.py)")
        add_scale_options(g)


def resolve_args(args: argparse.Namespace, extra_cases: Mapping[str, bool] | None = None) -> argparse.Namespace:
    """Fill the defaults (``--smoke``'s where it is given) and check the options; ``args.cases`` = the cases to run.
    ``extra_cases``: name → whether it runs by default. Raises BenchError."""
    extra = dict(extra_cases or {})
    if not hasattr(args, "store"):
        args.store, args.synthetic = None, True
    if (args.store is None) == (not args.synthetic):
        raise BenchError("give a STORE or --synthetic (not both)")
    for name, value in DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, SMOKE.get(name, value) if args.smoke else value)
    args.fresh = bool(args.fresh or (args.smoke and args.work is None))
    known = CASES + tuple(extra)
    default = ["bound", "loader", "cache", "build"] + (["profile"] if args.synthetic else [])
    default += [name for name, on in extra.items() if on]
    cases = default if args.only is None else [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(known))
    if unknown:
        raise BenchError(f"--only: unknown case(s) {unknown}; choose among {list(known)}")
    if not args.synthetic and ("profile" in cases or args.profile is not None):
        raise BenchError("the profile case needs --synthetic (it prepares a second store from the generated source)")
    args.profile = args.profile or DEFAULT_PROFILE
    if "profile" in cases and profile_available():
        try:
            profile_digest(args.profile)
        except ValueError as e:
            raise BenchError(f"--profile: {e}") from None
    if args.max_windows is not None and args.max_windows < 1:
        raise BenchError("--max-windows must be >= 1")
    if min(args.workers + args.cache_workers) < 0 or args.batch_size < 1 or args.frames < 1:
        raise BenchError("--workers/--cache-workers must be >= 0, --batch-size and --frames >= 1")
    args.cases = cases
    return args


def open_store(url: str, stream: str) -> Any:
    """The Dataset at ``url``, checked to have the video stream ``stream``; BenchError (naming ``url``) else."""
    from ..api import Dataset
    from ..store import Store

    try:
        ds = Dataset(Store(url))
    except (MMLoaderError, OSError) as e:
        msg = " ".join(str(e).split())
        raise BenchError(msg if url in msg else f"{url}: {msg}") from None
    videos = sorted({r["stream"] for r in ds.streams.select(["stream", "kind"]).to_pylist() if r["kind"] == "video"})
    if stream not in videos:
        have = f"its video streams: {', '.join(videos)}" if videos else "it has no video stream"
        raise BenchError(f"{url}: no video stream {stream!r} to benchmark ({have})")
    return ds


def _windows(ds: Any, args: argparse.Namespace) -> Any:
    mods = (["imu"] if "imu" in ds.modalities else []) + [args.stream]
    try:
        ws = ds.windows(sec=args.sec, stride=args.stride, modalities=mods, frames=args.frames,
                        size=tuple(args.size), video_backend=args.backend)
    except (ValueError, TypeError) as e:
        raise BenchError(str(e)) from None
    if len(ws) == 0:
        raise BenchError(f"{ds.url}: no windows of {args.sec:g} s with {', '.join(mods)} ({ws.report()['dropped']})")
    return ws


@contextlib.contextmanager
def _work(args: argparse.Namespace) -> Iterator[Path]:
    """The synthetic data's folder (reused, or a throwaway one with ``--fresh``); in STORE mode a temporary
    folder for the caches (under ``--work`` when given)."""
    with work_folder(args.work, WORK_NAME, args.synthetic and not args.fresh, "mmloader-bench-") as folder:
        yield folder


def run_bench(args: argparse.Namespace, log: Callable[[str], None],
              extra: Mapping[str, Extra] | None = None) -> dict[str, Any]:
    """Every case of ``args.cases`` on the generated store (``--synthetic``) or on ``args.store``; the result."""
    with _work(args) as work:
        src = None
        if args.synthetic:
            src, url = source_and_store(work, args, log)
        else:
            url = args.store
        ds = open_store(url, args.stream)
        return _run_on(ds, args, log, work, src, dict(extra or {}))


def _setup(args: argparse.Namespace, url: str) -> dict[str, Any]:
    drop = {"cases", "func", "command"} | (set() if args.synthetic else set(GENERATION))
    keep = {k: v for k, v in vars(args).items() if k not in drop}
    return {**keep, "cases": args.cases, "store": url}


def _describe(ds: Any, ws: Any, args: argparse.Namespace, media: list) -> dict[str, Any]:
    video = measure.describe_video(ds, ws, args.stream, media)
    if args.synthetic:  # what was asked of the encoder; the measured interval stays beside it
        video.update({"encoder": "libx264", "gop": args.gop, "resolution": list(args.video_size), "fps": args.fps,
                      "seconds_per_video": args.seconds, "preset": args.preset, "crf": args.crf,
                      "grain": args.grain})
    return video


def _run_on(ds: Any, args: argparse.Namespace, log: Callable[[str], None], work: Path, src: Path | None,
            extra: dict[str, Extra]) -> dict[str, Any]:
    ws = _windows(ds, args)
    media = measure.media_of(ds, args.stream, measure.referenced_recordings(ws))
    result: dict[str, Any] = {"machine": machine(), "video": _describe(ds, ws, args, media),
                              "setup": _setup(args, ds.url), "windows": len(ws), "bound": None, "loader": [],
                              "cache_first_epoch": [], "cache_build": [], "notes": []}
    v = result["video"]
    log(f"{len(ws)} windows; {v['codec']} {v['resolution'][0]}x{v['resolution'][1]}, GOP {v['gop']}; "
        f"backend {ws.video_backend}")
    bound = None
    if "bound" in args.cases:
        log(f"bound: decoding every frame of {len(media)} video(s) once, in order")
        result["bound"] = measure.sequential_bound(media, len(ws))
        bound = result["bound"]["windows_per_s"]
        log(f"  {result['bound']['frames_per_s']} frames/s = {bound} windows/s")
    if "loader" in args.cases:
        result["loader"] = measure.loader_cases(ws, args, bound, log)
    _cache_cases(ws, args, bound, work, log, result)
    if "profile" in args.cases:
        _profile(ds, ws, args, bound, work, src, log, result)
    for name, fn in extra.items():
        if name in args.cases:
            result[name] = fn(ws, args, bound, log)
    result["ratios"] = ratios(result, extra)
    return result


def _cache_cases(ws: Any, args: argparse.Namespace, bound: float | None, work: Path, log: Callable[[str], None],
                 result: dict[str, Any]) -> None:
    if not {"cache", "build"} & set(args.cases):
        return
    k = len(ws) if args.max_windows is None else min(args.max_windows, len(ws))
    sub = ws if k == len(ws) else ws.filter(np.arange(len(ws)) < k)
    result["cache_windows"] = len(sub)
    with tempfile.TemporaryDirectory(prefix="caches-", dir=work) as tmp:
        if "cache" in args.cases:
            result["cache_first_epoch"] = measure.cache_first_epochs(sub, args, bound, Path(tmp), log)
        if "build" in args.cases:
            result["cache_build"] = measure.cache_build(sub, args, bound, Path(tmp), log)


def _profile(ds: Any, ws: Any, args: argparse.Namespace, bound: float | None, work: Path, src: Path | None,
             log: Callable[[str], None], result: dict[str, Any]) -> None:
    if src is None or not profile_available():
        result["notes"].append("profile: skipped, the Ego4D recipe here has no video_profile= (transcode profiles)")
        log(result["notes"][-1])
        return
    from ..api import Dataset
    from ..store import Store

    url = profile_store(work, src, args.profile, log)
    pds = Dataset(Store(url))
    pws = _windows(pds, args)
    shuffled = [r for r in result["loader"] if r["shuffle"] and r["workers"] == 0]
    out = measure.profile_case(pws, ws, args, bound, shuffled[0] if shuffled else None, log)
    pmedia = measure.media_of(pds, args.stream, measure.referenced_recordings(pws))
    result["profile"] = {"name": args.profile, "store": url,
                         "video": measure.describe_video(pds, pws, args.stream, pmedia), **out}
    result["profile_shuffled_gain"] = out["shuffled_gain"]


def ratios(result: dict[str, Any], extra: Mapping[str, Any] = ()) -> dict[str, float | None]:
    """Case → its ratio to the bound."""
    out = {f"loader_{'shuffled' if r['shuffle'] else 'ordered'}_w{r['workers']}": r["ratio"] for r in result["loader"]}
    out.update({f"cache_first_epoch_w{r['workers']}": r["ratio"] for r in result["cache_first_epoch"]})
    out.update({f"cache_build_w{r['workers']}": r["ratio"] for r in result["cache_build"]})
    if result.get("profile"):
        out["profile_ordered_w0"] = result["profile"]["ordered"]["ratio"]
        out["profile_shuffled_w0"] = result["profile"]["shuffled"]["ratio"]
    out.update({name: result[name]["ratio"] for name in extra if result.get(name)})
    return out


def _rows(result: dict[str, Any]) -> list[tuple[str, float, float | None]]:
    rows = []
    if result["bound"]:
        rows.append((f"bound ({result['bound']['frames_per_s']} frames/s)", result["bound"]["windows_per_s"], 1.0))
    for r in result["loader"]:
        rows.append((f"loader {'shuffled' if r['shuffle'] else 'ordered'}, {r['workers']} workers",
                     r["windows_per_s"], r["ratio"]))
    for r in result["cache_first_epoch"]:
        rows.append((f"cache first epoch, {r['workers']} workers", r["windows_per_s"], r["ratio"]))
    for r in result["cache_build"]:
        rows.append((f"cache build, {r['workers']} workers", r["windows_per_s"], r["ratio"]))
    if result.get("profile"):
        p = result["profile"]
        for order in ("ordered", "shuffled"):
            rows.append((f"profile {p['name']} loader {order}, 0 workers", p[order]["windows_per_s"],
                         p[order]["ratio"]))
    for name, r in result.items():
        if isinstance(r, dict) and "windows_per_s" in r and name not in ("bound", "cache_build"):
            rows.append((r.get("label", name), r["windows_per_s"], r.get("ratio")))
    return rows


def format_table(result: dict[str, Any]) -> str:
    """The human-readable summary: machine, video (codec, resolution, GOP), windows, then case, windows/s, ratio."""
    m, v, s = result["machine"], result["video"], result["setup"]
    lines = [f"machine  {m['cpus']} CPUs, {m['processor'] or m['platform']}, Python {m['python']}, "
             f"mmloader {m['mmloader']}",
             f"video    {v['codec']} {v['resolution'][0]}x{v['resolution'][1]}, {v['fps']:g} fps, GOP {v['gop']} "
             f"(mean keyframe interval {v['measured_keyframe_interval']}), {v['videos']} x "
             f"{v['seconds_per_video']:g} s, {v['mbit_per_s']} Mbit/s; backend {v['backend']}",
             f"windows  {result['windows']}: {s['sec']:g} s, stride {s['stride']:g} s, {s['frames']} frames at "
             f"{s['size'][0]}x{s['size'][1]}, batch {s['batch_size']}",
             f"{'case':<44} {'windows/s':>10} {'ratio':>7}"]
    for label, wps, r in _rows(result):
        lines.append(f"{label:<44} {wps:>10.3f} {'-' if r is None else f'{r:.3f}':>7}")
    if result.get("profile_shuffled_gain") is not None:
        lines.append(f"profile shuffled gain: {result['profile_shuffled_gain']}x the original files")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)


def finish(result: dict[str, Any], output: str | None) -> None:
    """The JSON on stdout (and in ``output``), the table on stderr."""
    emit(result, output, format_table(result))


def run_cli(args: argparse.Namespace) -> int:
    """``mmloader bench``: resolve, run, print. BenchError for a benchmark that cannot run as asked."""
    from . import scale

    if getattr(args, "scale", False):
        return scale.run_cli(args)
    if scale.scale_only_given(args):
        raise BenchError(f"{', '.join(scale.scale_only_given(args))}: option(s) of --scale only")
    resolve_args(args)
    finish(run_bench(args, Progress()), args.output)
    return 0
