"""``mmloader bench --scale``: IMU-only windows over thousands of recordings, side by side with a memory bound.

Generates once (``built_once`` under ``--work``) a store of ``--recordings`` x ``--seconds`` of ``--channels``
float32 channels at ``--hz`` (regular timestamps, Gaussian noise; one recording in memory at a time) with
``mmloader.write_store``, then measures in one process:

- ``index``: ``windows(sec, stride, modalities=["imu"], imu_hz=hz)``: seconds, µs per window, RSS growth
  (``VmRSS``; peak: ``VmHWM`` after resetting it, and ``getrusage``), pickled bytes of the set.
- ``bound``: the same windows gathered from memory (every recording's IMU loaded into ``(C, N)`` arrays first;
  per batch, each window's ``T`` samples copied into a ``(B, C, T)`` float32 array), per order.
- ``worker_start``: the forkserver's start (once per process: it imports torch and mmloader) and one batch read by
  one worker, before any loader case, so that no case carries it alone.
- ``ordered`` / ``shuffled`` / ``block``: one loader per worker count (``shuffle=False`` / ``True`` /
  ``"block"``, persistent workers) over ``--loader-epochs`` epochs (of ``K`` windows spread over the index with
  ``--max-windows K``): the first epoch's windows/s (cold: worker start-up, every chunk decoded once per process),
  first-batch latency and ratio to the bound of the same order; the later epochs' windows/s (warm) and ratio; the
  speed-up of each worker count over 0 workers, first and later epochs. ``block`` is skipped, with a note, when the loader
  does not accept ``shuffle="block"``.
- ``parallel``: the bound for workers, per loader order and worker count ``W >= 1`` of ``--workers``: ``W``
  independent processes, each reading its own contiguous ``1/W`` of the windows at 0 workers, each epoch started
  together, taking their turns in the loader case's rounds (``parallel_bound``); ``parallel_speedup``: their
  windows/s ÷ the 0-worker loader's, the most ``W`` workers could give here (shared memory bandwidth and caches);
  ``workers_of_parallel_bound``: ``W`` workers' windows/s ÷ ``W`` processes' (medians of the rounds' ratios; at
  ``W = 1``, what the pool itself costs, with no process competing for a core).
- ``cache``: the windows plus a deterministic 512-float ``video_emb`` (what ``imu2clip train`` reads from its
  embedding cache) cached eagerly (build time), then ``--loader-epochs`` shuffled (and block-shuffled) epochs at
  0 workers: the first (every shard and chunk file opened for the first time in the process) and the later ones.
- ``rss``: one loader with 2 persistent workers, shuffled, over ``--epochs-rss`` epochs: each worker's ``VmRSS``
  after each epoch and its growth from the first epoch to the last (%).

Rates are windows per second of wall clock (``time.perf_counter``). JSON on stdout, a table on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import pickle
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .run import BenchError
from .util import Progress, Timer, built_once, emit, machine, rate, work_folder

Log = Callable[[str], None]
CASES = ("index", "bound", "ordered", "shuffled", "block", "parallel", "cache", "rss")
ORDERS: dict[str, Any] = {"ordered": False, "shuffled": True, "block": "block"}  # case → the loader's shuffle=
WORK_NAME = "mmloader-bench-scale"
RSS_WORKERS = 2
EMB_DIM = 512
DEFAULTS: dict[str, Any] = dict(recordings=1000, seconds=120.0, hz=200.0, channels=6, sec=5.0, stride=1.0,
                                batch_size=256, workers=[0, 1, 2], epochs_rss=10, loader_epochs=3, loader_rounds=3,
                                seed=0)
SMOKE: dict[str, Any] = dict(recordings=20, seconds=20.0, batch_size=32, workers=[0, 1], epochs_rss=2,
                             loader_epochs=2, loader_rounds=1)
SCALE_ONLY = ("recordings", "hz", "channels", "epochs_rss", "loader_epochs", "loader_rounds")
# options of the video benchmark that --scale does not use (``mmloader bench``'s parser has both)
VIDEO_ONLY = ("videos", "video_size", "fps", "gop", "preset", "crf", "grain", "profile", "frames", "size",
              "stream", "backend", "orders", "cache_workers")


def ratio(value: float, bound: float | None) -> float | None:
    """``value / bound`` to 3 significant digits (the bound is far above small-batch rates), None without one."""
    return float(f"{value / bound:.3g}") if bound else None


def _d(name: str, text: str) -> str:
    smoke = f"; --smoke: {SMOKE[name]}" if name in SMOKE else ""
    return f"{text} (--scale default: {DEFAULTS[name]}{smoke})"


def add_scale_options(g: Any) -> None:
    """The options only ``--scale`` has (``mmloader bench``'s parser adds these beside the video ones)."""
    g.add_argument("--recordings", type=int, help=_d("recordings", "recordings in the generated store"))
    g.add_argument("--hz", type=float, help=_d("hz", "IMU rate, Hz (also the windows' imu_hz)"))
    g.add_argument("--channels", type=int, help=_d("channels", "IMU channels (float32)"))
    g.add_argument("--epochs-rss", type=int, help=_d("epochs_rss", f"epochs of the rss case ({RSS_WORKERS} "
                                                                  "persistent workers)"))
    g.add_argument("--loader-epochs", type=int, help=_d("loader_epochs", "epochs of each loader case, one loader "
                                                                        "with persistent workers: the first epoch "
                                                                        "(cold) and the later ones (warm) reported "
                                                                        "apart"))
    g.add_argument("--loader-rounds", type=int, help=_d("loader_rounds", "rounds of the loader cases of an "
                                                                        "order, each with fresh loaders, the "
                                                                        "worker counts taking turns epoch by "
                                                                        "epoch; medians over rounds are reported "
                                                                        "(speedups: of each round's ratios)"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of the scale benchmark (``benchmarks/scale.py``'s parser)."""
    g = p.add_argument_group("generated store")
    add_scale_options(g)
    g.add_argument("--seconds", type=float, help=_d("seconds", "seconds per recording"))
    g.add_argument("--seed", type=int, help=_d("seed", "data and shuffling seed"))
    g.add_argument("--work", default=None, help=f"where the store is kept and reused (default: <temp dir>/"
                                                f"{WORK_NAME})")
    g.add_argument("--fresh", action="store_true", help="generate into a throwaway temp dir instead of --work")
    w = p.add_argument_group("windows and cases")
    w.add_argument("--sec", type=float, help=_d("sec", "window length, s"))
    w.add_argument("--stride", type=float, help=_d("stride", "window stride, s"))
    w.add_argument("--batch-size", type=int, help=_d("batch_size", "loader batch size"))
    w.add_argument("--workers", type=int, nargs="+", help=_d("workers", "loader worker counts"))
    w.add_argument("--shard-size", type=int, default=None, help="window cache shard size (default: the cache's)")
    w.add_argument("--max-windows", type=int, default=None,
                   help="the loader and rss cases' epochs run over K windows spread over every recording; the "
                        "cache case caches the first K windows")
    w.add_argument("--only", default=None, help=f"comma-separated cases among {','.join(CASES)} (default: all; "
                                                f"the index is always built)")
    p.add_argument("--output", default=None, help="also write the JSON result to this file")
    p.add_argument("--smoke", action="store_true", help="tiny defaults that run in seconds (a check that the "
                                                        "benchmark works, not a measurement)")


def scale_only_given(args: argparse.Namespace) -> list[str]:
    """The ``--scale``-only options set in ``args`` (as ``--name``)."""
    return [f"--{n.replace('_', '-')}" for n in SCALE_ONLY if getattr(args, n, None) is not None]


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults (``--smoke``'s where given), check the options, set ``args.cases``. Raises BenchError."""
    if getattr(args, "store", None) is not None or getattr(args, "synthetic", False):
        raise BenchError("--scale generates its own IMU store: give no STORE and no --synthetic")
    video = [f"--{n.replace('_', '-')}" for n in VIDEO_ONLY if getattr(args, n, None) is not None]
    if video:
        raise BenchError(f"{', '.join(video)}: video benchmark option(s), not used by --scale")
    for name, value in DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, SMOKE.get(name, value) if args.smoke else value)
    args.fresh = bool(args.fresh or (args.smoke and args.work is None))
    cases = list(CASES) if args.only is None else [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise BenchError(f"--only: unknown case(s) {unknown}; choose among {list(CASES)}")
    if args.recordings < 1 or args.channels < 1 or args.batch_size < 1:
        raise BenchError("--recordings, --channels and --batch-size must be >= 1")
    if not (args.hz > 0 and args.sec > 0 and args.stride > 0):
        raise BenchError("--hz, --sec and --stride must be > 0")
    if args.seconds < args.sec:
        raise BenchError(f"--seconds ({args.seconds:g}) must be >= --sec ({args.sec:g})")
    if min(args.workers) < 0:
        raise BenchError("--workers must be >= 0")
    if args.max_windows is not None and args.max_windows < 1:
        raise BenchError("--max-windows must be >= 1")
    if args.loader_epochs < 1 or args.loader_rounds < 1:
        raise BenchError("--loader-epochs and --loader-rounds must be >= 1")
    if "rss" in cases and args.epochs_rss < 2:
        raise BenchError("--epochs-rss must be >= 2 (growth is measured from the first epoch to the last)")
    if "parallel" in cases and not {"ordered", "shuffled", "block"} & set(cases):
        raise BenchError("--only parallel: the parallel bound runs in the rounds of a loader case; add ordered, "
                         "shuffled or block")
    args.cases = [c for c in CASES if c in cases]
    return args


# -- the store -------------------------------------------------------------------------------------------------------


def _recordings(args: argparse.Namespace) -> Iterator[Any]:
    """The generated recordings, one at a time: regular timestamps at ``hz`` from 0, standard normal float32."""
    from ..recipes.custom import Recording, TimeSeriesInput

    n = int(round(args.seconds * args.hz))
    t_ns = np.round(np.arange(n) * (1e9 / args.hz)).astype(np.int64)
    names = ["ax", "ay", "az", "gx", "gy", "gz"] if args.channels == 6 else [f"c{k}" for k in range(args.channels)]
    units = ["m/s^2"] * 3 + ["rad/s"] * 3 if args.channels == 6 else ["1"] * args.channels
    for r in range(args.recordings):
        data = np.random.default_rng([args.seed, r]).standard_normal((n, args.channels), dtype=np.float32)
        yield Recording(f"rec{r:05d}", split=("train", "val", "test")[r % 3],
                        timeseries={"imu": TimeSeriesInput(t_ns, data, names, units, rate_hz=args.hz)})


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def make_store(work: Path, args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """The generated store under ``work`` (built once per parameters): url, recordings, bytes, write_s."""
    from ..recipes.custom import write_store

    name = f"imu-{args.recordings}x{args.seconds:g}s-{args.channels}ch-{args.hz:g}hz-seed{args.seed}"
    path = work / name
    timing = path.with_name(name + ".write.json")
    built = []

    def build(p: Path) -> None:
        log(f"writing {args.recordings} recordings x {args.seconds:g} s of {args.channels} channels at "
            f"{args.hz:g} Hz to {p}")
        with Timer() as t:
            write_store(str(p), _recordings(args), dataset="bench-scale")
        timing.write_text(json.dumps({"write_s": round(t.seconds, 2)}) + "\n")
        built.append(True)

    built_once(path, build)
    write_s = json.loads(timing.read_text())["write_s"] if timing.exists() else None
    out = {"url": str(path), "recordings": args.recordings, "seconds": args.seconds, "hz": args.hz,
           "channels": args.channels, "bytes": _tree_bytes(path), "write_s": write_s, "reused": not built}
    log(f"store: {out['bytes'] / 1e6:.0f} MB, written in {write_s} s{' (reused)' if not built else ''}")
    return out


# -- index -----------------------------------------------------------------------------------------------------------


def _status_kb(key: str, pid: int | str = "self") -> int | None:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``), None where there is none."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


def _reset_peak() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0: ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def index_case(ds: Any, args: argparse.Namespace, log: Log) -> tuple[Any, dict[str, Any]]:
    """The window set and what building it cost: seconds, µs per window, RSS growth (MB), pickled bytes."""
    log(f"index: windows(sec={args.sec:g}, stride={args.stride:g}, modalities=['imu'], imu_hz={args.hz:g})")
    gc.collect()
    rss0, reset = _status_kb("VmRSS"), _reset_peak()
    with Timer() as t:
        ws = ds.windows(sec=args.sec, stride=args.stride, modalities=["imu"], imu_hz=args.hz)
    rss1, hwm = _status_kb("VmRSS"), _status_kb("VmHWM")
    maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    pickled = len(pickle.dumps(ws, protocol=pickle.HIGHEST_PROTOCOL))
    n = len(ws)
    out = {"windows": n, "seconds": round(t.seconds, 3), "us_per_window": round(t.seconds / max(n, 1) * 1e6, 2),
           "rss_growth_mb": _mb(rss1 - rss0) if rss0 and rss1 else None,
           "peak_growth_mb": _mb(hwm - rss0) if reset and hwm and rss0 else None,
           "peak_rss_mb_getrusage": _mb(maxrss_kb), "pickled_bytes": pickled,
           "pickled_bytes_per_window": round(pickled / max(n, 1), 1)}
    log(f"  {n} windows in {out['seconds']} s ({out['us_per_window']} µs each), RSS +{out['rss_growth_mb']} MB "
        f"(peak +{out['peak_growth_mb']} MB), pickled {pickled / 1e6:.1f} MB")
    return ws, out


# -- the bound: a numpy gather from memory ---------------------------------------------------------------------------


class Memory:
    """Every recording's IMU of a window set in memory, ``(C, N)`` float32, and per window its array and first
    sample; ``gather(indices)`` is the ``(B, C, T)`` float32 batch of those windows."""

    def __init__(self, ws: Any, stream: str = "imu"):
        rids = np.asarray(ws.index["recording_id"].to_pylist())
        t0 = ws.index["t0_ns"].to_numpy()
        names, self.rec = np.unique(rids, return_inverse=True)
        self.arrays: list[np.ndarray] = []
        self.start = np.empty(len(t0), dtype=np.int64)
        by_rec = np.argsort(self.rec, kind="stable")
        bounds = np.searchsorted(self.rec[by_rec], np.arange(len(names) + 1))
        for k, rid in enumerate(names):
            ts = ws.store.read_timeseries(str(rid), stream)
            self.arrays.append(np.ascontiguousarray(np.asarray(ts.data, dtype=np.float32).T))
            mine = by_rec[bounds[k]:bounds[k + 1]]
            self.start[mine] = np.searchsorted(np.asarray(ts.t_ns), t0[mine])
        self.T = int(ws[0][stream].shape[-1]) if len(ws) else 0
        self.C = self.arrays[0].shape[0] if self.arrays else 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def gather(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), self.C, self.T), dtype=np.float32)
        arrays, rec, start, T = self.arrays, self.rec, self.start, self.T
        for j, i in enumerate(indices.tolist()):
            s = start[i]
            out[j] = arrays[rec[i]][:, s:s + T]
        return out


def order_of(ws: Any, shuffle: Any, seed: int) -> np.ndarray:
    """The loader's window order of epoch 0 (``shuffle``: False, True, ``"block"``)."""
    loader = ws.loader(batch_size=1, shuffle=shuffle, seed=seed)
    try:
        return np.asarray(loader.order(0))
    finally:
        loader.close()


def _batches_todo(n: int, args: argparse.Namespace) -> int:
    total = -(-n // args.batch_size)
    return total if args.max_windows is None else min(total, -(-args.max_windows // args.batch_size))


def bound_case(ws: Any, args: argparse.Namespace, orders: dict[str, Any], log: Log) -> dict[str, Any]:
    """The gather from memory in each of ``orders`` (case → the loader's shuffle=), the loader's batches."""
    log("bound: loading every recording's IMU into memory")
    with Timer() as t:
        mem = Memory(ws)
    out: dict[str, Any] = {"load_s": round(t.seconds, 2), "memory_mb": round(mem.nbytes / 2**20, 1),
                           "window_shape": [mem.C, mem.T]}
    out["matches_loader"] = bool(np.array_equal(mem.gather(np.array([len(ws) - 1]))[0],
                                                ws[len(ws) - 1]["imu"].numpy()))
    for case, shuffle in orders.items():
        order = order_of(ws, shuffle, args.seed)
        todo = _batches_todo(len(order), args)
        mem.gather(order[:args.batch_size])  # warm-up, untimed
        n = 0
        with Timer() as tt:
            for b in range(todo):
                n += len(mem.gather(order[b * args.batch_size:(b + 1) * args.batch_size]))
        out[case] = {"batches": todo, **rate(n, tt.seconds, rate_digits=1)}
        log(f"  {case}: {out[case]['windows_per_s']} windows/s")
    del mem
    gc.collect()
    return out


# -- the loader ------------------------------------------------------------------------------------------------------


def block_support(ws: Any) -> str | None:
    """None when ``ws.loader(shuffle="block")`` is accepted, else why not (the error's message)."""
    try:
        ws.loader(batch_size=1, shuffle="block").close()
    except (TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def loader_cases(ws: Any, args: argparse.Namespace, case: str, bound: dict | None,
                 log: Log) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The loaders of ``ws`` in order ``case``, one per ``--workers`` count (persistent workers), over
    ``--loader-epochs`` whole epochs (of ``--max-windows`` windows spread over the index, when given), in
    ``--loader-rounds`` rounds. In a round every worker count has a fresh loader and they take turns epoch by epoch,
    so that a drift of the machine's speed (this VM varies by tens of percent within minutes) falls on all of them
    alike. Per worker count: the first epoch's windows/s (cold: start-up and every chunk decoded for the first
    time; ``windows_per_s``, ``first_batch_s``, ``ratio``) and the later epochs' (warm; ``later_windows_per_s``,
    ``ratio_later``), medians over rounds, each round's in ``rounds``. Each loader reads a copy of ``ws`` as a worker
    gets it (pickled: no decoded chunks), so 0 workers starts as cold as workers do. With the ``parallel`` case,
    a team of ``W`` independent processes (``_Team``) per worker count ``W >= 1`` takes its turns in the same
    rounds: → (loader results, team results)."""
    sub = _spread(ws, args.max_windows, args.seed)
    teams = sorted({w for w in args.workers if w >= 1}) if "parallel" in args.cases else []
    per: dict[int, list[tuple[list[tuple[int, float]], float]]] = {w: [] for w in args.workers}
    per_team: dict[int, list[tuple[list[tuple[int, float]], float]]] = {p: [] for p in teams}
    for r in range(args.loader_rounds):
        log(f"loader: {case}, round {r + 1} of {args.loader_rounds}: workers {args.workers}"
            f"{f' and {teams} independent processes' if teams else ''} taking turns over {args.loader_epochs} "
            f"epochs of {len(sub)} windows")
        loaders = {w: pickle.loads(pickle.dumps(sub, protocol=pickle.HIGHEST_PROTOCOL)).loader(
            batch_size=args.batch_size, shuffle=ORDERS[case], seed=args.seed, num_workers=w, persistent_workers=True)
            for w in args.workers}
        got: dict[int, list[tuple[int, float]]] = {w: [] for w in args.workers}
        got_team: dict[int, list[tuple[int, float]]] = {p: [] for p in teams}
        first: dict[int, float] = {}
        started: dict[int, _Team] = {}
        try:
            for p in teams:
                started[p] = _Team(sub, p, args, case)
            for _ in range(args.loader_epochs):
                for w, loader in loaders.items():
                    n, seconds, latency = _one_epoch(loader)
                    got[w].append((n, seconds))
                    first.setdefault(w, latency)
                for p, team in started.items():
                    got_team[p].append(team.epoch())
        finally:
            for loader in loaders.values():
                loader.close()
            for team in started.values():
                team.close()
        for w in args.workers:
            per[w].append((got[w], first[w]))
        for p in teams:
            per_team[p].append((got_team[p], 0.0))
    loaders_out = [_loader_result(case, w, len(sub), per[w], bound, log) for w in args.workers]
    teams_out = []
    for p in teams:
        t = _loader_result(case, p, len(sub), per_team[p], bound, log, what="independent processes")
        t["processes"] = t.pop("workers")
        t.pop("first_batch_s")
        teams_out.append(t)
    return loaders_out, teams_out


def _team_member(part: Any, spec: dict[str, Any], commands: Any, out: Any) -> None:
    """In a process of its own: a loader of ``part`` at 0 workers; one epoch per command, ``(windows, seconds)``
    put on ``out``; ``None``: stop."""
    import torch as _torch

    _torch.set_num_threads(1)
    loader = part.loader(batch_size=spec["batch_size"], shuffle=spec["shuffle"], seed=spec["seed"], num_workers=0)
    out.put("ready")
    while commands.get() is not None:
        n, seconds, _ = _one_epoch(loader)
        out.put((n, seconds))


class _Team:
    """The bound for ``procs`` workers: ``procs`` independent processes, each reading its own contiguous
    ``1/procs`` of the windows at 0 workers (no loader between them: no dispatch, no shared memory, no main
    process). ``epoch()`` starts an epoch in all of them at once → (all their windows, seconds until the last
    is done, as this process saw it). What the machine gives ``procs`` processes doing this work side by side
    (memory bandwidth and caches are shared), measured in turn with the loaders."""

    def __init__(self, sub: Any, procs: int, args: argparse.Namespace, case: str):
        import multiprocessing as mp

        ctx = mp.get_context("forkserver")
        spec = {"batch_size": args.batch_size, "shuffle": ORDERS[case], "seed": args.seed}
        bounds = np.linspace(0, len(sub), procs + 1).astype(int)
        at = np.arange(len(sub))
        self.commands = [ctx.Queue() for _ in range(procs)]
        self.out = ctx.Queue()
        self.procs = [ctx.Process(target=_team_member, daemon=True, args=(sub.filter((at >= a) & (at < b)), spec,
                                                                          cmd, self.out))
                      for (a, b), cmd in zip(zip(bounds[:-1], bounds[1:]), self.commands)]
        for p in self.procs:
            p.start()
        for _ in self.procs:
            if self.out.get(timeout=3600) != "ready":
                raise BenchError("a process of the parallel bound did not start")

    def epoch(self) -> tuple[int, float]:
        t0 = time.perf_counter()
        for cmd in self.commands:
            cmd.put("epoch")
        parts = [self.out.get(timeout=3600) for _ in self.procs]
        return sum(n for n, _ in parts), time.perf_counter() - t0

    def close(self) -> None:
        for cmd in self.commands:
            cmd.put(None)
        for p in self.procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()


def _loader_result(case: str, workers: int, n: int, rounds: list[tuple[list[tuple[int, float]], float]],
                   bound: dict | None, log: Log, what: str = "workers") -> dict[str, Any]:
    """One worker count's rounds (each: its epochs' ``(windows, seconds)`` and first-batch latency), summarized."""
    firsts, laters, per_round = [], [], []
    for epochs, latency in rounds:
        later = epochs[1:]
        warm = rate(sum(k for k, _ in later), sum(t for _, t in later), rate_digits=1)["windows_per_s"] if later else None
        firsts.append(rate(*epochs[0], rate_digits=1)["windows_per_s"])
        laters.append(warm)
        per_round.append({"windows_per_s": firsts[-1], "later_windows_per_s": warm, "first_batch_s": round(latency, 3),
                          "per_epoch_windows_per_s": [rate(k, t, rate_digits=1)["windows_per_s"] for k, t in epochs]})
    first = round(float(np.median(firsts)), 1)
    warm = round(float(np.median(laters)), 1) if laters[0] is not None else None
    b = (bound or {}).get(case, {}).get("windows_per_s")
    per_epoch = np.median([r["per_epoch_windows_per_s"] for r in per_round], axis=0)
    out = {"order": case, "workers": workers, "windows": n, "epochs": len(rounds[0][0]), "rounds": per_round,
           "windows_per_s": first, "first_batch_s": round(float(np.median([r["first_batch_s"] for r in per_round])), 3),
           "ratio": ratio(first, b), "per_epoch_windows_per_s": [round(float(v), 1) for v in per_epoch],
           "later_windows_per_s": warm, "ratio_later": ratio(warm, b) if warm else None}
    log(f"  {case}, {workers} {what}: first epoch {first} windows/s (rounds {firsts}); later epochs {warm} "
        f"(rounds {laters})")
    return out


def worker_start_case(ws: Any, args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """The loader's process-wide start-up, paid once by whichever loader first starts workers: the ``forkserver``
    (it imports torch and mmloader) and one worker reading one batch. Measured before the loader cases, so that
    none of them carries it alone; each still starts its own workers from the running server in its first epoch."""
    sub = ws.filter(np.arange(len(ws)) < min(len(ws), args.batch_size))
    with Timer() as t:
        loader = sub.loader(batch_size=args.batch_size, num_workers=1)
        _epochs(loader, 1)
    log(f"workers: forkserver started and one batch read by one worker in {t.seconds:.2f} s (once per process)")
    return {"forkserver_and_first_batch_s": round(t.seconds, 3)}


def round_ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a``'s windows/s ÷ ``b``'s, first epoch and later epochs. Cases that ran in rounds (taking turns within
    each): the median of each round's own ratio, each in ``*_rounds``."""
    pairs = list(zip(a.get("rounds") or [a], b.get("rounds") or [b]))
    out: dict[str, Any] = {}
    for name, key in (("first_epoch", "windows_per_s"), ("later_epochs", "later_windows_per_s")):
        each = [x[key] / y[key] for x, y in pairs if x.get(key) and y.get(key)]
        out[name] = round(float(np.median(each)), 3) if each else None
        if len(pairs) > 1:
            out[f"{name}_rounds"] = [round(v, 3) for v in each]
    return out


def speedups(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per order and worker count but 0: its windows/s over 0 workers' (``round_ratios``)."""
    zero = {r["order"]: r for r in runs if r["workers"] == 0}
    return {f"{r['order']}_w{r['workers']}": round_ratios(r, zero[r["order"]])
            for r in runs if r["workers"] and r["order"] in zero}


def parallel_speedups(teams: list[dict[str, Any]], loaders: list[dict[str, Any]]) -> tuple[dict, dict]:
    """(``W`` independent processes over one — the 0-worker loader of the same rounds —: the most ``W`` workers
    could give; ``W`` workers over ``W`` processes: how much of that they do give), per order and ``W``."""
    zero = {r["order"]: r for r in loaders if r["workers"] == 0}
    by = {(r["order"], r["workers"]): r for r in loaders}
    over_one = {f"{t['order']}_p{t['processes']}": round_ratios(t, zero[t["order"]]) for t in teams if t["order"] in zero}
    of_bound = {f"{t['order']}_w{t['processes']}": round_ratios(by[(t["order"], t["processes"])], t)
                for t in teams if (t["order"], t["processes"]) in by}
    return over_one, of_bound


# -- the cache: IMU + a video embedding per window, as imu2clip train reads -----------------------------------------


class EmbeddedImu:
    """A window set with a deterministic ``video_emb`` (``(EMB_DIM,)`` float32) per window: a ``Windows``
    (``len``, ``[i]``, ``index_fields``, ``fingerprint_components``), picklable, like the plugin's
    ``EmbeddedWindows`` reading its embedding cache. Window ``i``'s embedding is row ``i % 61`` of a seeded table,
    scaled by ``1 + i / len``."""

    def __init__(self, windows: Any, seed: int = 0):
        self.windows = windows
        self.seed = seed
        self.table = np.random.default_rng([seed, EMB_DIM]).standard_normal((61, EMB_DIM), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.windows[i]
        k = sample["index"]
        emb = self.table[k % len(self.table)] * np.float32(1 + k / len(self))
        sample["video_emb"] = torch.from_numpy(emb)
        return sample

    def index_fields(self, i: int) -> dict[str, Any]:
        return self.windows.index_fields(i)

    def index_fields_batch(self, indices: Any) -> dict[str, Any]:
        from ..windows.collate import batch_index_fields

        return batch_index_fields(self.windows, indices)

    def fingerprint_components(self) -> dict[str, Any]:
        return {**self.windows.fingerprint_components(), "bench_video_emb": {"dim": EMB_DIM, "seed": self.seed}}

    def will_read(self, indices: Any) -> None:
        hint = getattr(self.windows, "will_read", None)
        if hint is not None:
            hint(indices)


def cache_case(ws: Any, args: argparse.Namespace, orders: dict[str, Any], bound: dict | None, tmp: Path,
               log: Log) -> dict[str, Any]:
    """``EmbeddedImu`` of ``ws`` (its first ``--max-windows`` windows) cached eagerly under ``tmp`` (build time),
    then one epoch over the cache at 0 workers per order of ``orders`` (shuffled; block when supported)."""
    from ..cache import cache_windows

    k = len(ws) if args.max_windows is None else min(args.max_windows, len(ws))
    sub = ws if k == len(ws) else ws.filter(np.arange(len(ws)) < k)
    url = tmp / "cache"
    log(f"cache: building the window cache of {k} windows (imu + {EMB_DIM}-float video_emb), eager, 0 workers")
    with Timer() as t:
        cached = cache_windows(EmbeddedImu(sub, args.seed), str(url), fill="eager", progress=False,
                               shard_size=args.shard_size)
    out: dict[str, Any] = {"windows": k, "build_s": round(t.seconds, 2),
                           "build_windows_per_s": round(k / max(t.seconds, 1e-9), 1), "bytes": _tree_bytes(url),
                           "runs": []}
    log(f"  built in {out['build_s']} s ({out['build_windows_per_s']} windows/s), {out['bytes'] / 1e6:.0f} MB")
    for case, shuffle in orders.items():
        log(f"cache: {case}, 0 workers, {args.loader_epochs} epochs")
        loader = cached.loader(batch_size=args.batch_size, shuffle=shuffle, seed=args.seed, num_workers=0)
        epochs, first = _epochs(loader, args.loader_epochs)
        b = (bound or {}).get(case, {}).get("windows_per_s")
        later = epochs[1:]
        warm = rate(sum(n for n, _ in later), sum(t for _, t in later), rate_digits=1)["windows_per_s"] if later else None
        r = {"order": case, "workers": 0, "windows": k, **rate(*epochs[0], rate_digits=1), "first_batch_s": first,
             "ratio": ratio(rate(*epochs[0])["windows_per_s"], b),
             "per_epoch_windows_per_s": [rate(n, t, rate_digits=1)["windows_per_s"] for n, t in epochs],
             "later_windows_per_s": warm, "ratio_later": ratio(warm, b) if warm else None}
        log(f"  first epoch {r['windows_per_s']} windows/s (shards opened, chunk files opened for the first time in "
            f"this process), later epochs {warm} windows/s; ratio {r['ratio']} (to the bound of IMU alone)")
        out["runs"].append(r)
    return out


def _one_epoch(loader: Any) -> tuple[int, float, float]:
    """One whole epoch of ``loader``: windows, seconds, and the first batch's latency (s)."""
    count, first, t0 = 0, None, time.perf_counter()
    for batch in loader:
        first = time.perf_counter() - t0 if first is None else first
        count += len(batch["index"])
    return count, time.perf_counter() - t0, first or 0.0


def _epochs(loader: Any, n: int) -> tuple[list[tuple[int, float]], float]:
    """``n`` whole epochs of ``loader``: (windows, seconds) each, and the first batch's latency (s)."""
    epochs, first = [], None
    try:
        for _ in range(n):
            count, seconds, latency = _one_epoch(loader)
            epochs.append((count, seconds))
            first = latency if first is None else first
    finally:
        loader.close()
    return epochs, round(first or 0.0, 3)


# -- worker RSS over epochs ------------------------------------------------------------------------------------------


def _spread(ws: Any, k: int | None, seed: int) -> Any:
    """``ws``, or ``k`` of its windows drawn (seeded) from every part of the index."""
    if k is None or k >= len(ws):
        return ws
    mask = np.zeros(len(ws), dtype=bool)
    mask[np.random.default_rng([seed, k]).choice(len(ws), size=k, replace=False)] = True
    return ws.filter(mask)


def rss_case(ws: Any, args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """One shuffled loader with ``RSS_WORKERS`` persistent workers over ``--epochs-rss`` whole epochs (of
    ``--max-windows`` windows spread over the index, when given): after each epoch each worker's VmRSS (MB) and
    the epoch's windows/s; growth from the first epoch to the last, % per worker."""
    sub = _spread(ws, args.max_windows, args.seed)
    loader = sub.loader(batch_size=args.batch_size, shuffle=True, seed=args.seed, num_workers=RSS_WORKERS,
                        persistent_workers=True)
    epochs, pids = [], []
    log(f"rss: {args.epochs_rss} epochs of {len(sub)} windows, shuffled, {RSS_WORKERS} persistent workers")
    try:
        for e in range(args.epochs_rss):
            n = 0
            with Timer() as t:
                for batch in loader:
                    n += len(batch["index"])
            pids.append(list(loader.worker_pids))
            rss = [_mb(_status_kb("VmRSS", p)) for p in pids[-1]]
            anon = [_mb(_status_kb("RssAnon", p)) for p in pids[-1]]
            epochs.append({"epoch": e + 1, "worker_rss_mb": rss, "worker_rss_anon_mb": anon,
                           **rate(n, t.seconds, rate_digits=1)})
            log(f"  epoch {e + 1}: {epochs[-1]['windows_per_s']} windows/s, worker RSS {rss} MB")
    finally:
        loader.close()
    growth, anon = _growth(epochs, "worker_rss_mb"), _growth(epochs, "worker_rss_anon_mb")
    valid = [g for g in growth if g is not None]
    return {"workers": RSS_WORKERS, "epochs": args.epochs_rss, "windows_per_epoch": len(sub),
            "same_workers": all(p == pids[0] for p in pids), "per_epoch": epochs, "growth_pct": growth,
            "max_growth_pct": max(valid) if valid else None, "anon_growth_pct": anon}


def _growth(epochs: list[dict[str, Any]], key: str) -> list[float | None]:
    """Per worker: (last epoch's ``key`` - the first's) / the first's, in %."""
    first, last = epochs[0][key], epochs[-1][key]
    return [round((b - a) / a * 100, 2) if a and b else None for a, b in zip(first, last)]


# -- the run ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _work(args: argparse.Namespace) -> Iterator[Path]:
    """The store's folder: ``--work`` (default ``<temp>/mmloader-bench-scale``), reused; ``--fresh``: a
    throwaway one."""
    with work_folder(args.work, WORK_NAME, not args.fresh, "mmloader-bench-scale-") as folder:
        yield folder


def _orders(ws: Any, args: argparse.Namespace, notes: list[str], log: Log) -> dict[str, Any]:
    """The orders to run (case → shuffle=): ordered and shuffled, and block when the loader supports it."""
    orders = {c: ORDERS[c] for c in ("ordered", "shuffled")}
    why = block_support(ws)
    if why is None:
        orders["block"] = "block"
    elif "block" in args.cases:
        notes.append(f"block: skipped, this loader has no shuffle='block' ({why})")
        log(notes[-1])
    return orders


def run_scale(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """Every case of ``args.cases`` on the generated store; the result (see the module docstring)."""
    from ..api import Dataset
    from ..store import Store

    setup = {k: v for k, v in vars(args).items() if k not in {"cases", "func", "command", "store", "synthetic",
                                                                 *VIDEO_ONLY}}
    result: dict[str, Any] = {"machine": machine(), "setup": {**setup, "cases": args.cases}, "notes": []}
    with _work(args) as work:
        result["store"] = make_store(work, args, log)
        ds = Dataset(Store(result["store"]["url"]))
        ws, result["index"] = index_case(ds, args, log)
        result["store"]["windows"] = len(ws)
        if len(ws) == 0:
            raise BenchError(f"no windows of {args.sec:g} s in the generated store ({ws.report()['dropped']})")
        orders = _orders(ws, args, result["notes"], log)
        result["worker_start"] = worker_start_case(ws, args, log) if any(w > 0 for w in args.workers) else None
        result["bound"] = bound_case(ws, args, orders, log) if "bound" in args.cases else None
        runs = [loader_cases(ws, args, case, result["bound"], log) for case in orders if case in args.cases]
        result["loader"] = [r for loaders, _ in runs for r in loaders]
        result["speedup_over_0_workers"] = speedups(result["loader"])
        if "parallel" in args.cases:
            result["parallel_bound"] = [t for _, teams in runs for t in teams]
            result["parallel_speedup"], result["workers_of_parallel_bound"] = parallel_speedups(
                result["parallel_bound"], result["loader"])
        if "cache" in args.cases:
            with tempfile.TemporaryDirectory(prefix="cache-", dir=work) as tmp:
                cache_orders = {c: s for c, s in orders.items() if c != "ordered"}
                result["cache"] = cache_case(ws, args, cache_orders, result["bound"], Path(tmp), log)
        result["rss"] = rss_case(ws, args, log) if "rss" in args.cases else None
    result["ratios"] = ratios(result)
    return result


def ratios(result: dict[str, Any]) -> dict[str, float | None]:
    """Case → its windows/s ÷ the bound's in the same order."""
    out = {f"loader_{r['order']}_w{r['workers']}": r["ratio"] for r in result["loader"]}
    for r in (result.get("cache") or {}).get("runs", []):
        out[f"cache_{r['order']}_w0"] = r["ratio"]
    return out


def _rows(result: dict[str, Any]) -> list[str]:
    rows = []
    bound = result.get("bound") or {}
    for case in ORDERS:
        if case in bound:
            rows.append(f"{'bound ' + case + ' (numpy gather from memory)':<44} {bound[case]['windows_per_s']:>11.1f}"
                        f" {'-':>9} {1.0:>8.3g}")
    runs = [(f"loader {r['order']}, {r['workers']} workers", r) for r in result["loader"]]
    runs += [(f"parallel bound {r['order']}, {r['processes']} processes", r) for r in result.get("parallel_bound") or []]
    runs += [(f"cache {r['order']}, 0 workers (imu + video_emb)", r)
             for r in (result.get("cache") or {}).get("runs", [])]
    for label, r in runs:
        rt = "-" if r.get("ratio") is None else f"{r['ratio']:.3g}"
        warm = r.get("later_windows_per_s")
        rl = "-" if r.get("ratio_later") is None else f"{r['ratio_later']:.3g}"
        later = f"{warm:>11.1f} {rl:>8}" if warm else f"{'-':>11} {'-':>8}"
        fb = f"{r['first_batch_s']:>9.3f}" if "first_batch_s" in r else f"{'-':>9}"
        rows.append(f"{label:<44} {r['windows_per_s']:>11.1f} {fb} {rt:>8} {later}")
    return rows


def format_table(result: dict[str, Any]) -> str:
    """Machine, store, index, then case / windows/s / first batch (s) / ratio to the bound, cache build, RSS."""
    m, st, ix = result["machine"], result["store"], result["index"]
    lines = [f"machine  {m['cpus']} CPUs, {m['processor'] or m['platform']}, Python {m['python']}, "
             f"mmloader {m['mmloader']}",
             f"store    {st['recordings']} recordings x {st['seconds']:g} s, {st['channels']} channels at "
             f"{st['hz']:g} Hz: {st['bytes'] / 1e6:.0f} MB, written in {st['write_s']} s"
             f"{' (reused)' if st['reused'] else ''}",
             f"index    {ix['windows']} windows: {ix['seconds']} s ({ix['us_per_window']} µs/window), RSS "
             f"+{ix['rss_growth_mb']} MB (peak +{ix['peak_growth_mb']} MB), pickled {ix['pickled_bytes'] / 1e6:.1f} MB "
             f"({ix['pickled_bytes_per_window']} B/window)",
             f"{'case (first epoch | later epochs)':<44} {'windows/s':>11} {'1st batch':>9} {'ratio':>8} "
             f"{'windows/s':>11} {'ratio':>8}", *_rows(result)]
    for case, sp in (result.get("speedup_over_0_workers") or {}).items():
        each = (f" (median of rounds: first {sp['first_epoch_rounds']}, later {sp.get('later_epochs_rounds')})"
                if "first_epoch_rounds" in sp else "")
        lines.append(f"speedup  {case} over 0 workers: first epoch {sp['first_epoch']}x, later epochs "
                     f"{sp['later_epochs']}x{each}")
    for case, sp in (result.get("parallel_speedup") or {}).items():
        lines.append(f"bound    {case} independent processes over 0 workers: first epoch {sp['first_epoch']}x, "
                     f"later epochs {sp['later_epochs']}x")
    for case, sp in (result.get("workers_of_parallel_bound") or {}).items():
        each = (f" (rounds: first {sp['first_epoch_rounds']}, later {sp.get('later_epochs_rounds')})"
                if "first_epoch_rounds" in sp else "")
        lines.append(f"of bound {case} over as many independent processes: first epoch {sp['first_epoch']}, later "
                     f"epochs {sp['later_epochs']}{each}")
    c = result.get("cache")
    if c:
        lines.append(f"cache    {c['windows']} windows built eagerly in {c['build_s']} s "
                     f"({c['build_windows_per_s']} windows/s), {c['bytes'] / 1e6:.0f} MB")
    r = result.get("rss")
    if r:
        first, last = r["per_epoch"][0], r["per_epoch"][-1]
        lines.append(f"rss      {r['workers']} persistent workers x {r['epochs']} epochs of {r['windows_per_epoch']}"
                     f" windows: worker RSS {first['worker_rss_mb']} -> {last['worker_rss_mb']} MB, growth "
                     f"{r['growth_pct']} %; epoch windows/s {[e['windows_per_s'] for e in r['per_epoch']]}")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)


def finish(result: dict[str, Any], output: str | None) -> None:
    """The JSON on stdout (and in ``output``), the table on stderr."""
    emit(result, output, format_table(result))


def run_cli(args: argparse.Namespace) -> int:
    """``mmloader bench --scale``: resolve, run, print. BenchError for options it cannot run with."""
    resolve_args(args)
    finish(run_scale(args, Progress()), args.output)
    return 0
