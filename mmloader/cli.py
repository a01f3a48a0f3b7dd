"""``mmloader`` command line: info, validate, prepare, sample.

Exit status: 0 success, 1 a data or store error (message on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from ._version import __version__
from .recipes import available, get_adapter
from .api import Dataset
from .errors import MMLoaderError, StoreFormatError
from .store import Store
from .video.transcode import VIDEO_PROFILES, VideoProfile, resolve_profile


def _profile_help(p: VideoProfile) -> str:
    size = f"{p.size[0]}x{p.size[1]}" if p.size else f"short side {p.short_side}" if p.short_side else "native size"
    return f"{size}, keyframe every {p.gop} frames" + (f", {p.fps:g} fps" if p.fps else "")


def _format_info(info: dict) -> str:
    lines = [
        f"dataset      {info['dataset']}",
        f"store        {info['url']}",
        f"format       v{info['format_version']} ({info['created_by']})",
        f"recordings   {info['recordings']}  ({info['hours']:.3f} h)",
        "splits       " + ", ".join(f"{k}: {v}" for k, v in info["splits"].items()),
        f"imu gaps     {info['gaps']}",
    ]
    profile = info.get("video_profile")
    if profile:
        lines.append(f"video        transcoded with profile {profile['name']}: "
                     f"{_profile_help(resolve_profile(profile))}")
    lines.append("modalities")
    for name, s in info["modalities"].items():
        hours = f"{s['hours']:.3f} h" if s["kind"] != "events" else ""
        lines.append(f"  {name:<12} {s['kind']:<10} {s['recordings']:>5} recordings {s['samples']:>10} samples  {hours}")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    info = Dataset(Store(args.store)).info()
    print(json.dumps(info, indent=1) if args.json else _format_info(info))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        problems = Store(args.store).validate()
    except StoreFormatError as e:
        problems = [str(e)]
    for p in problems:
        print(p, file=sys.stderr)
    print(f"{args.store}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1


def _prepare_extras(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe options asked for on the command line (``--copy-media``, ``--video-profile``), each checked
    against what the dataset's recipe accepts (UsageError naming the option otherwise)."""
    import inspect

    extra: dict[str, Any] = {}
    if getattr(args, "copy_media", False):
        extra["copy_media"] = True
    if getattr(args, "video_profile", None):
        extra["video_profile"] = args.video_profile
    params = inspect.signature(get_adapter(args.dataset).prepare).parameters
    for key in extra:
        if key not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise UsageError(f"dataset {args.dataset!r} has no --{key.replace('_', '-')} option")
    return extra


def cmd_prepare(args: argparse.Namespace) -> int:
    adapter = get_adapter(args.dataset)
    extra = _prepare_extras(args)
    url = adapter.prepare(args.src, args.dst, overwrite=args.overwrite, progress=not args.quiet, errors=args.errors,
                          **extra)
    ds = Dataset(Store(url))
    report = ds.report()
    totals = report.get("totals", {})
    print(f"prepared {ds.info()['recordings']} recordings into {url}")
    if totals:
        print("report: " + json.dumps(totals))
    for line in _left_out_lines(report):
        print(line)
    return 0


def _left_out_lines(report: dict, limit: int = 20) -> list[str]:
    """What the prepare report says was left out: failed recordings and why (``--errors skip``), repeated
    ids, dropped events, and sources skipped (grouped by reason)."""
    lines: list[str] = []

    def listing(title: str, items: dict) -> None:
        if not items:
            return
        lines.append(f"{title}: {len(items)}")
        for k, why in list(items.items())[:limit]:
            lines.append(f"  {k}: {why}")
        if len(items) > limit:
            lines.append(f"  ... and {len(items) - limit} more (reports/prepare.json in the store)")

    listing("left out (bad source; --errors skip)", report.get("failed") or {})
    listing("repeated recording ids", report.get("duplicates") or {})
    dropped = {uid: f"{r['events_dropped']['events']} event(s): " + "; ".join(r["events_dropped"]["problems"][:3])
               for uid, r in (report.get("recordings") or {}).items() if (r.get("events_dropped") or {}).get("events")}
    listing("bad events dropped (--errors skip)", dropped)
    by_reason: dict[str, list[str]] = {}
    for k, why in (report.get("skipped") or {}).items():
        by_reason.setdefault(str(why), []).append(str(k))
    for why, ids in by_reason.items():
        more = f", ... and {len(ids) - 5} more" if len(ids) > 5 else ""
        lines.append(f"skipped ({why}): {len(ids)}: {', '.join(ids[:5])}{more}")
    return lines


def cmd_sample(args: argparse.Namespace) -> int:
    if args.dataset != "ego4d":
        print(f"mmloader sample: no sample generator for {args.dataset!r} (available: ego4d)", file=sys.stderr)
        return 2
    from .samples.ego4d import generate_ego4d_sample

    root = generate_ego4d_sample(
        args.dir, videos=args.videos, seconds=args.seconds, seed=args.seed,
        defect_fraction=args.defect_fraction, progress=not args.quiet,
    )
    print(f"wrote a sample Ego4D tree ({args.videos} videos x {args.seconds:g} s) to {root}")
    return 0


class UsageError(Exception):
    """A bad argument found after parsing (by the same checks the Python API runs): one line, exit status 2."""


def _count(minimum: int):
    """argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def add_rank_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--rank R --world-size W`` (both or neither; default: from torchrun's or srun's environment, else one
    process): the place of this process in a first pass spread over processes or machines; ``what`` says what a
    rank does (the help text)."""
    parser.add_argument("--rank", type=_count(0), default=None,
                        help=f"this process's rank, 0 <= R < W (default: torchrun's RANK or srun's SLURM_PROCID, "
                             f"else 0; a SLURM array: --rank $SLURM_ARRAY_TASK_ID); each rank {what}")
    parser.add_argument("--world-size", type=_count(1), default=None,
                        help="how many ranks share the work (default: WORLD_SIZE or SLURM_STEP_NUM_TASKS, else 1; "
                             "a SLURM array: --world-size $SLURM_ARRAY_TASK_COUNT)")


def rank_arguments(args: argparse.Namespace) -> tuple[int, int]:
    """``(rank, world_size)`` from ``--rank/--world-size`` or the launcher's environment (SystemExit naming the
    flags when only one is given or the rank is out of range)."""
    from .dist import launch_rank_world

    try:
        return launch_rank_world(args.rank, args.world_size)
    except ValueError as e:
        raise SystemExit(f"error: --rank/--world-size: {e}") from None


# -- window options: shared by ``windows``, ``cache build`` and the plugins' commands (imu2clip embed/evaluate) ---
# option → (flags, add_argument keywords, the Dataset.windows keyword it sets)
_WINDOW_ARGS: dict[str, tuple[tuple[str, ...], dict[str, Any], str | None]] = {
    "store": (("store",), {}, None),
    "sec": (("--sec",), dict(type=float, default=5.0, help="window length, seconds"), "sec"),
    "stride": (("--stride",), dict(type=float, default=None, help="seconds between window starts (default: sec)"),
               "stride"),
    "modalities": (("--modalities",), dict(nargs="+", default=["imu", "video"], help="e.g. imu video text"),
                   "modalities"),
    "anchor": (("--anchor",), dict(choices=["tile", "events"], default="tile"), "anchor"),
    "imu_hz": (("--imu-hz",), dict(type=float, default=200.0), "imu_hz"),
    "frames": (("--frames",), dict(type=_count(1), default=4, help="frames per window"), "frames"),
    "size": (("--size",), dict(type=int, nargs=2, metavar=("H", "W"), help="resize frames at decode time"), "size"),
    "split": (("--split",), dict(default=None), "split"),
    "backend": (("--backend",), dict(default="auto", help="video backend: auto, pyav, decord, torchcodec"),
                "video_backend"),
}
WINDOW_OPTIONS = tuple(_WINDOW_ARGS)
"""The window options :func:`add_window_arguments` knows, in the order ``mmloader windows`` lists them."""


def add_window_arguments(parser: argparse.ArgumentParser, options: Sequence[str] = WINDOW_OPTIONS, *,
                         defaults: dict[str, Any] | None = None, help: dict[str, str] | None = None) -> None:
    """Add the options that describe a window set to ``parser``, in the order of ``options`` (names of
    :data:`WINDOW_OPTIONS`: ``store`` is the positional store URL, the others ``--sec``, ``--stride``,
    ``--modalities``, ``--anchor``, ``--imu-hz``, ``--frames``, ``--size H W``, ``--split``, ``--backend``).
    ``defaults`` / ``help``: another default or help text for some of them (a command's own defaults). The parsed
    values become ``Dataset.windows`` keyword arguments with :func:`window_kwargs`."""
    unknown = sorted(set(options) - set(_WINDOW_ARGS))
    if unknown:
        raise ValueError(f"unknown window options {unknown}; known: {list(WINDOW_OPTIONS)}")
    for name in options:
        flags, kw, _ = _WINDOW_ARGS[name]
        kw = dict(kw)
        if defaults and name in defaults:
            kw["default"] = defaults[name]
        if help and name in help:
            kw["help"] = help[name]
        parser.add_argument(*flags, **kw)


def window_kwargs(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """The ``Dataset.windows(...)`` keyword arguments of the window options on ``args`` (those
    :func:`add_window_arguments` added; ``store`` is not one), with ``overrides`` on top (e.g. ``modalities`` a
    command derives from its own options). ``size`` becomes a tuple (or None); ``frames`` is left out when the
    modalities do not include ``video``."""
    kw = {key: getattr(args, name) for name, (_, _, key) in _WINDOW_ARGS.items()
          if key is not None and hasattr(args, name)}
    kw.update(overrides)
    if "size" in kw:
        kw["size"] = tuple(kw["size"]) if kw["size"] else None
    if "video" not in kw.get("modalities", ()):
        kw.pop("frames", None)
    return kw


def _windows_from_args(args: argparse.Namespace):
    """The WindowSet that the window options of ``windows`` and ``cache build`` describe."""
    ds = Dataset(Store(args.store))
    try:  # the Python API's own checks: a bad value is a usage error (exit 2), named like argparse names it
        return ds.windows(**window_kwargs(args))
    except (ValueError, TypeError) as e:
        raise UsageError(_flag_message(str(e))) from None


# the Python argument a check names → the flag that sets it (windows / cache build)
_FLAGS = {key: flags[0] for flags, _, key in _WINDOW_ARGS.values() if key is not None}


def _flag_message(msg: str) -> str:
    """``imu_hz must be ...`` → ``argument --imu-hz: imu_hz must be ...`` (argparse's wording)."""
    import re

    m = re.match(r"(?:\S+: )?(\w+)\b", msg)
    names = [m.group(1)] if m else []
    names += re.findall(r"\b(\w+)=", msg)[:1]
    for name in names:
        if name in _FLAGS:
            return f"argument {_FLAGS[name]}: {msg}"
    return msg


def cmd_windows(args: argparse.Namespace) -> int:
    import time

    from tqdm.auto import tqdm

    ws = _windows_from_args(args)
    report = ws.report()
    print(f"{ws!r}")
    print(f"candidates {report['candidates']}  kept {report['kept']}  dropped " + json.dumps(report["dropped"]))
    if ws.modalities.video:
        print(f"video backend {ws.video_backend}")
    if len(ws) == 0 or args.epochs == 0:
        return 0
    loader = ws.loader(batch_size=args.batch_size, shuffle=True, seed=0, num_workers=args.workers)
    for epoch in range(args.epochs):
        t = time.perf_counter()
        n = 0
        for batch in tqdm(loader, desc=f"epoch {epoch}", unit="batch", disable=args.quiet):
            if n == 0 and epoch == 0:
                shapes = {k: tuple(v.shape) for k, v in batch.items() if hasattr(v, "shape")}
                print("first batch: " + ", ".join(f"{k} {v}" for k, v in shapes.items()))
            n += len(batch["index"])
        dt = time.perf_counter() - t
        print(f"epoch {epoch}: {n} windows in {dt:.2f} s ({n / dt:.1f} windows/s)")
    return 0


# -- cache (mmloader.cache): build | info | clear ---------------------------------------------------
def _format_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _format_spec(spec: dict) -> str:
    keys = ("sec", "stride", "modalities", "anchor", "imu_hz", "frames", "video_fps", "size", "video_backend")
    return " ".join(f"{k}={','.join(map(str, spec[k])) if isinstance(spec[k], list) else spec[k]}"
                    for k in keys if spec.get(k) is not None)


def cmd_cache_build(args: argparse.Namespace) -> int:
    import time

    from .loader import fill_cache

    rank, world = rank_arguments(args)
    if args.overwrite and world > 1:
        raise SystemExit("error: --overwrite with several ranks: every rank would clear the others' shards; clear "
                         f"the cache once first (mmloader cache clear {args.url}), then build without --overwrite")
    ws = _windows_from_args(args)
    t = time.perf_counter()
    cached = ws.cache(args.url, fill="lazy", shard_size=args.shard_size, overwrite=args.overwrite)
    counts = fill_cache(cached, num_workers=args.workers, progress=not args.quiet, rank=rank, world_size=world)
    st = cached.window_cache.status(verify=False)
    print(f"cache        {cached.window_cache.url}")
    print(f"fingerprint  {cached.window_cache.fingerprint}")
    if counts["world_size"] > 1:
        print(f"rank         {counts['rank']} of {counts['world_size']}: shards [{counts['first_shard']}, "
              f"{counts['stop_shard']}); {st['shards_complete']} of {st['shards_total']} complete in the cache")
    print(f"windows      {len(ws)} in {st['shards_total']} shards; filled {counts['filled']}, already complete "
          f"{counts['already_complete']}, by workers {counts['filled_by_workers']}, by other processes "
          f"{counts['filled_by_others']} "
          f"({time.perf_counter() - t:.1f} s)")
    print(f"size         {_format_bytes(st['bytes'])}")
    return 0


def _cache_summary(url: str, verify: bool) -> dict:
    from .cache import WindowCache

    cache = WindowCache.inspect(url)
    st = cache.status(verify=verify)
    return {**st, "verified": verify, "stale": cache.stale_reason(), "spec": cache.components["spec"],
            "store_url": cache.components["store_url"], "transforms": cache.components["transforms"]}


def cmd_cache_info(args: argparse.Namespace) -> int:
    from .cache import cache_root, list_caches

    if args.url is None:
        urls = list_caches()
        infos = [_cache_summary(u, args.verify) for u in urls]
        if args.json:
            print(json.dumps(infos, indent=1))
            return 0
        print(f"{len(infos)} window cache(s) under {cache_root()}")
        for s in infos:
            state = f"STALE: {s['stale']}" if s["stale"] else "current"
            print(f"  {s['fingerprint']}  {s['shards_complete']:>5}/{s['shards_total']:<5} shards  "
                  f"{_format_bytes(s['bytes']):>10}  {state}  {_format_spec(s['spec'])}")
        return 0
    s = _cache_summary(args.url, args.verify)
    bad = s["torn"] or s["corrupt"]
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        print(f"cache        {s['url']}")
        print(f"fingerprint  {s['fingerprint']}")
        print(f"status       {'STALE: ' + s['stale'] if s['stale'] else 'current'}")
        print(f"store        {s['store_url']}")
        print(f"spec         {_format_spec(s['spec'])}" + (f"  transforms={s['transforms']}" if s["transforms"] else ""))
        print(f"windows      {s['n_windows']} in shards of {s['shard_size']}")
        print(f"shards       {s['shards_complete']}/{s['shards_total']} complete"
              f"{' (checksums verified)' if args.verify else ''}; torn {s['torn']}, corrupt {s['corrupt']}")
        print(f"size         {_format_bytes(s['bytes'])}")
        for p in s["problems"]:
            print(p, file=sys.stderr)
    return 1 if bad else 0


def cmd_cache_clear(args: argparse.Namespace) -> int:
    from .cache import clear, clear_all

    if (args.url is None) == (not (args.all or args.stale)):
        print("mmloader cache clear: give a cache URL, or --all, or --stale", file=sys.stderr)
        return 2
    if args.url is not None:
        print(f"{'removed' if clear(args.url) else 'nothing at'} {args.url}")
        return 0
    gone = clear_all(stale_only=args.stale)
    print(f"removed {len(gone)} cache(s)" + "".join(f"\n  {u}" for u in gone))
    return 0


def _add_cache_parser(sub: argparse._SubParsersAction) -> None:
    from .cache import DEFAULT_SHARD_SIZE

    cache = sub.add_parser("cache", help="window caches: build, info, clear")
    csub = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    s = csub.add_parser("build", help="build (or repair) the cache of a window set now")
    add_window_arguments(s)
    s.add_argument("--url", default="auto", help="where to write the cache (default: the cache dir, by fingerprint)")
    s.add_argument("--shard-size", type=_count(1), default=DEFAULT_SHARD_SIZE, help="windows per shard")
    s.add_argument("--overwrite", action="store_true", help="replace another window set's cache at --url")
    s.add_argument("--workers", type=_count(0), default=0,
                   help="worker processes, each filling contiguous runs of whole shards (0: this process)")
    add_rank_arguments(s, "fills only its contiguous part of the shards")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_cache_build)
    s = csub.add_parser("info", help="one cache in detail, or every cache in the cache dir (exit 1: torn/corrupt)")
    s.add_argument("url", nargs="?", default=None)
    s.add_argument("--verify", action="store_true", help="check every checksum (reads the whole cache)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_cache_info)
    s = csub.add_parser("clear", help="delete a cache, every cache (--all) or the stale ones (--stale)")
    s.add_argument("url", nargs="?", default=None)
    s.add_argument("--all", action="store_true", help="every cache in the cache dir")
    s.add_argument("--stale", action="store_true", help="the caches whose store changed or is gone")
    s.set_defaults(func=cmd_cache_clear)
# -- end cache --------------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    """``mmloader bench STORE|--synthetic``: the video benchmark (``mmloader.bench``); JSON on stdout, progress
    and a table on stderr. A benchmark that cannot run as asked (no such store, no video stream) exits 2."""
    from .bench import BenchError
    from .bench.run import run_cli

    try:
        return run_cli(args)
    except BenchError as e:
        raise UsageError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmloader", description="Timestamp-aligned multimodal windows from egocentric recordings.")
    p.add_argument("--version", action="version", version=f"mmloader {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("info", help="summarise a prepared store")
    s.add_argument("store", help="store path or fsspec URL")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("validate", help="check a store deeply: every file (size, sha256) and every Zarr chunk "
                                        "(present, crc32c); exit 1 on problems")
    s.add_argument("store")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("prepare", help="turn a native dataset into a store")
    s.add_argument("dataset", help=f"dataset name ({', '.join(available())})")
    s.add_argument("src", help="folder of the native data")
    s.add_argument("dst", help="store path or fsspec URL to write")
    s.add_argument("--overwrite", action="store_true", help="replace an existing store at DST")
    s.add_argument("--errors", choices=["raise", "skip"], default="raise",
                   help="on a bad source file: abort (default) or skip that recording and report it")
    s.add_argument("--copy-media", action="store_true",
                   help="copy the media files into DST/media/ (a self-contained store that can be moved or "
                        "uploaded); Ego4D otherwise references its source mp4s, Aria stores always hold theirs")
    s.add_argument("--video-profile", metavar="NAME", choices=sorted(VIDEO_PROFILES),
                   help="transcode each video once into DST/media/ for shuffled video training: "
                        + "; ".join(f"{p.name}: {_profile_help(p)}" for p in VIDEO_PROFILES.values())
                        + ". Frame capture times are kept; the profile is recorded in the store")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("windows", help="build windows on a store, print the report, optionally load them")
    add_window_arguments(s)
    s.add_argument("--epochs", type=_count(0), default=1, help="epochs to load (0: only build and report)")
    s.add_argument("--batch-size", type=_count(1), default=16)
    s.add_argument("--workers", type=_count(0), default=0)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_windows)

    s = sub.add_parser("sample", help="write a small synthetic dataset in its native layout")
    s.add_argument("dataset", help="ego4d")
    s.add_argument("dir", help="output folder")
    s.add_argument("--videos", type=int, default=8)
    s.add_argument("--seconds", type=float, default=60.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--defect-fraction", type=float, default=0.3, help="fraction of IMU CSVs carrying the known defects")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sample)

    _add_cache_parser(sub)  # mmloader cache build|info|clear

    from .bench import add_arguments as add_bench_arguments

    s = sub.add_parser("bench", help="the video benchmark: windows/s and ratio to the sequential decode bound, on a "
                                     "store or on generated Ego4D-like data (--synthetic)")
    add_bench_arguments(s)
    s.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"mmloader {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (MMLoaderError, FileExistsError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mmloader {args.command}: error: {msg}", file=sys.stderr)
        return 1
    except OSError as e:  # a DST under a file, no permission, a full disk...: one line, not a traceback
        print(f"mmloader {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
