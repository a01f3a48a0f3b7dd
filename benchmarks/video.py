"""Ego4D-like video: the first pass over long-GOP 1080p H.264 against the decoder's sequential bound. Prints JSON.

    python benchmarks/video.py [--videos 2 --seconds 90 --video-size 1920 1080 --fps 30 --gop 250
                                --preset veryfast --crf 19 --grain 6 --sec 5 --stride 1 --frames 4 --size 224 224
                                --batch-size 8 --workers 0 1 2 --orders ordered shuffled --cache-workers 0
                                --max-windows K --only bound,loader,cache,build --backend auto
                                --work DIR | --fresh] [--smoke]

Generates once, with PyAV, ``--videos`` H.264 files (libx264, ``--preset``, ``--crf``, a fixed GOP of ``--gop``
frames: keyint = min-keyint, no scene-cut keyframes) of ``--seconds`` s at ``--fps``, whose content is not
trivially compressible (a panning textured scene with cuts, independently moving textured blocks, per-frame sensor
grain of ``--grain`` levels; the defaults give about 9 Mbit/s at 1080p30, a common bitrate for such video),
with matching 200 Hz IMU CSVs and an ego4d.json in the Ego4D layout (v2/ego4d.json, v2/full_scale/<uid>.mp4,
v2/imu/<uid>.csv), and prepares them with the Ego4D recipe. Both are kept under
``--work`` (default ``<temp dir>/mmloader-bench-video``) in a folder named by the parameters and reused by the
next run with the same parameters; ``--fresh`` uses a throwaway temp dir instead.

On the windows ``sec``/``stride``, modalities imu + video, ``frames`` frames at ``size`` it times (``--only``
picks the cases):

- ``bound``: every frame of every video decoded once, in order, with PyAV (thread_type AUTO), no conversion:
  frames/s, and windows/s = all windows ÷ that time. Each case's ``ratio`` = its windows/s ÷ this.
- ``loader``: ``wins.loader(batch_size, num_workers=W, shuffle=S)`` for W in ``--workers`` and S in ``--orders``,
  from a fresh loader (worker start-up included; ``first_batch_s`` says how long the first batch took).
  ``--max-windows K`` times only the first ceil(K / batch_size) batches of the epoch.
- ``cache``: the window cache's first (filling) epoch: ``wins.cache(url, fill="lazy")`` on an empty cache, then
  one pass in index order (``loader(shuffle=False, num_workers=W)`` for W in ``--cache-workers``).
- ``build``: ``mmloader cache build``, i.e. ``wins.cache(url, fill="eager")`` on an empty cache.
  With ``--max-windows K`` both cache cases cache the first K windows in index order (``wins.filter``): a cache
  fills whole shards, so a truncated pass would not say what it decoded.

Output keys: machine, video (backend, codec, GOP, resolution, fps, seconds, preset, crf, bitrate, keyframe
interval measured on the store), setup, windows, bound, loader, cache_first_epoch, cache_build, ratios (case →
ratio to the bound).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

import mmloader
from mmloader.recipes import get_adapter
from common import Progress, Timer, built_once, emit, machine, parse_args, parser, rate, ratio, reused_dir

SMOKE = dict(videos=1, seconds=4.0, video_size=[320, 240], fps=30.0, gop=30, sec=1.0, stride=1.0, frames=2,
             size=[64, 64], batch_size=2, workers=[0], cache_workers=[0], fresh=True)
CASES = ("bound", "loader", "cache", "build")
ORDERS = {"ordered": False, "shuffled": True}
IMU_HZ = 200.0
IMU_HEADER = ("component_idx,component_timestamp_ms,canonical_timestamp_ms,gyro_x,gyro_y,gyro_z,"
              "accl_x,accl_y,accl_z")
CONTENT_VERSION = 1  # bump when the generated pictures change: a new folder name, a fresh generation


# -- generation ------------------------------------------------------------------------------------------------------


def _blocky_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """(H, W, 3) float32 noise in [-1, 1], constant over ``cell`` × ``cell`` pixel squares."""
    h, w = -(-shape[0] // cell), -(-shape[1] // cell)
    low = rng.uniform(-1.0, 1.0, (h, w, 3)).astype(np.float32)
    return np.repeat(np.repeat(low, cell, axis=0), cell, axis=1)[: shape[0], : shape[1]]


def _texture(rng: np.random.Generator, shape: tuple[int, int], unit: int) -> np.ndarray:
    """(H, W, 3) uint8: a colour gradient plus noise at three scales (``unit``: the finest cell, px)."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3).astype(np.float32)
    grad = np.stack([np.sin(2 * np.pi * x / w * (k + 1) + y / h * 3.0 + phase[k]) for k in range(3)], axis=-1)
    img = 128 + 45 * grad
    for cell, amp in ((unit * 16, 40), (unit * 4, 28), (unit, 16)):
        img += amp * _blocky_noise(rng, shape, cell)
    return np.clip(img, 0, 255).astype(np.uint8)


class Scene:
    """Frames of a panning camera over a wide textured scene (a cut each time the pan wraps), with textured blocks
    moving on their own paths and per-frame sensor grain: content with real motion and detail, so that an encoder
    spends realistic bits and a decoder realistic time on it."""

    BLOCKS = 6

    def __init__(self, size: tuple[int, int], fps: float, seed: int, grain: int = 6):
        self.w, self.h = size
        self.fps = fps
        rng = np.random.default_rng(seed)
        unit = max(2, self.h // 180)
        self.margin = max(8, self.h // 10)
        self.world = _texture(rng, (self.h + 2 * self.margin, 2 * self.w), unit)
        bw, bh = max(8, self.w // 8), max(8, self.h // 6)
        self.blocks = [_texture(rng, (bh, bw), max(1, unit // 2)) for _ in range(self.BLOCKS)]
        self.block_pos = rng.uniform(0, 1, (self.BLOCKS, 2))
        self.block_vel = rng.uniform(-0.25, 0.25, (self.BLOCKS, 2))  # frame fractions per second
        self.grain = rng.integers(-grain, grain + 1, (8, self.h, self.w, 3), dtype=np.int16)
        self.pick = rng.integers(0, 8, 1 << 16)
        self.pan_speed = self.w / 20.0  # px/s: a cut every 20 s
        self.sway = rng.uniform(0, 2 * np.pi, 2)

    def frame(self, i: int) -> np.ndarray:
        t = i / self.fps
        dx = int(round(self.pan_speed * t + 0.08 * self.w * math.sin(0.9 * t + self.sway[0]))) % self.w
        dy = int(round(self.margin * (1 + 0.8 * math.sin(1.7 * t + self.sway[1]))))
        img = self.world[dy:dy + self.h, dx:dx + self.w].astype(np.int16)
        for b, tex in enumerate(self.blocks):
            bh, bw = tex.shape[:2]
            p = np.abs(((self.block_pos[b] + self.block_vel[b] * t) % 2.0) - 1.0)  # bounce in [0, 1]
            y0, x0 = int(p[0] * (self.h - bh)), int(p[1] * (self.w - bw))
            img[y0:y0 + bh, x0:x0 + bw] = tex
        img += self.grain[self.pick[i % len(self.pick)]]
        return np.clip(img, 0, 255).astype(np.uint8)


def encode_video(path: Path, args, seed: int, log: Progress) -> int:
    """One H.264 mp4 of ``args.seconds`` s; returns its frame count."""
    import av

    rate_ = Fraction(args.fps).limit_denominator(1001)
    n = int(round(args.seconds * args.fps))
    scene = Scene(tuple(args.video_size), args.fps, seed, args.grain)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate_)
        stream.width, stream.height = args.video_size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = 1 / rate_
        stream.options = {"preset": args.preset, "crf": str(args.crf),
                          "x264-params": f"keyint={args.gop}:min-keyint={args.gop}:scenecut=0"}
        step = max(1, n // 10)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(scene.frame(i), format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate_
            container.mux(stream.encode(frame))
            if (i + 1) % step == 0:
                log(f"  {path.name}: {i + 1}/{n} frames encoded")
        container.mux(stream.encode(None))
    return n


def write_imu(path: Path, seconds: float, rng: np.random.Generator) -> None:
    """A clean 200 Hz IMU CSV on the canonical clock (one component) covering the whole video."""
    t = np.arange(int(seconds * IMU_HZ)) / IMU_HZ
    gyro = 0.5 * np.sin(np.outer(t, [1.3, 0.7, 2.1]) + rng.uniform(0, 6, 3)) + rng.normal(0, 0.01, (t.size, 3))
    accl = np.sin(np.outer(t, [2.0, 1.1, 3.3]) + rng.uniform(0, 6, 3)) + rng.normal(0, 0.04, (t.size, 3))
    accl[:, 2] += 9.81
    canon = t * 1000.0
    table = np.column_stack([np.zeros_like(t), canon + 1.6e12, canon, gyro, accl])
    np.savetxt(path, table, fmt=["%d", "%.3f", "%.3f"] + ["%.6f"] * 6, delimiter=",", header=IMU_HEADER,
               comments="")


def generate_source(root: Path, args, log: Progress) -> None:
    """The Ego4D layout under ``root``: v2/ego4d.json, v2/full_scale/<uid>.mp4, v2/imu/<uid>.csv."""
    (root / "v2" / "full_scale").mkdir(parents=True)
    (root / "v2" / "imu").mkdir(parents=True)
    rng = np.random.default_rng(args.seed)
    videos = []
    for k in range(args.videos):
        uid = f"bench-{k:03d}"
        log(f"generating {uid}: {args.seconds:g} s at {args.video_size[0]}x{args.video_size[1]}")
        n = encode_video(root / "v2" / "full_scale" / f"{uid}.mp4", args, args.seed * 1000 + k, log)
        write_imu(root / "v2" / "imu" / f"{uid}.csv", args.seconds, rng)
        videos.append({"video_uid": uid, "duration_sec": n / args.fps, "has_imu": True, "split_fho": "train",
                       "video_metadata": {"fps": args.fps, "num_frames": n, "video_codec": "h264",
                                          "video_start_sec": 0.0}})
    (root / "v2" / "ego4d.json").write_text(json.dumps({"version": "v2", "videos": videos, "clips": []}, indent=1))


def source_and_store(work: Path, args, log: Progress) -> tuple[Path, str]:
    """The generated source and its store under ``work``, each made once per parameter set."""
    name = (f"ego4d-like-v{args.videos}-s{args.seconds:g}-{args.video_size[0]}x{args.video_size[1]}-fps{args.fps:g}"
            f"-gop{args.gop}-{args.preset}-crf{args.crf:g}-grain{args.grain}-seed{args.seed}-c{CONTENT_VERSION}")
    src = built_once(work / name, lambda p: generate_source(p, args, log))

    def prepare(dst: Path) -> None:
        log("preparing the store with the Ego4D recipe")
        get_adapter("ego4d").prepare(str(src), str(dst), progress=False)

    store = built_once(work / (name + "-store"), prepare)
    return src, str(store)


# -- measurements ----------------------------------------------------------------------------------------------------


def sequential_bound(videos: list[Path], n_windows: int) -> dict:
    """Every frame of every video decoded once, in order (PyAV, threads AUTO, frames not converted)."""
    import av

    frames = 0
    with Timer() as t:
        for path in videos:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for _ in container.decode(stream):
                    frames += 1
    out = rate(frames, t.seconds, unit="frames")
    out["windows"] = n_windows
    out["windows_per_s"] = round(n_windows / max(t.seconds, 1e-9), 3)
    return out


def time_pass(ws, *, workers: int, shuffle: bool, batch_size: int, seed: int, max_batches: int | None) -> dict:
    """Windows/s of a fresh loader's first ``max_batches`` batches (all when None), start-up included."""
    loader = ws.loader(batch_size=batch_size, shuffle=shuffle, seed=seed, num_workers=workers)
    todo = len(loader) if max_batches is None else min(max_batches, len(loader))
    n, first = 0, None
    it = iter(loader)
    t0 = time.perf_counter()
    for _ in range(todo):
        n += len(next(it)["index"])
        if first is None:
            first = time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    it.close()
    loader.close()
    out = {"workers": workers, "shuffle": shuffle, "batches": todo, **rate(n, seconds, rate_digits=3)}
    out["first_batch_s"] = round(first or 0.0, 3)
    return out


def loader_cases(ws, args, bound: float | None, log: Progress) -> list[dict]:
    max_batches = None if args.max_windows is None else -(-args.max_windows // args.batch_size)
    runs = []
    for order in args.orders:
        for w in args.workers:
            log(f"loader: {order}, {w} workers")
            r = time_pass(ws, workers=w, shuffle=ORDERS[order], batch_size=args.batch_size, seed=args.seed,
                          max_batches=max_batches)
            r["ratio"] = ratio(r["windows_per_s"], bound)
            log(f"  {r['windows_per_s']} windows/s, ratio {r['ratio']}")
            runs.append(r)
    return runs


def cache_first_epochs(sub, args, bound: float | None, tmp: Path, log: Progress) -> list[dict]:
    runs = []
    for w in args.cache_workers:
        log(f"cache: first (filling) epoch, index order, {w} workers")
        cached = sub.cache(str(tmp / f"lazy-w{w}"), fill="lazy", progress=False, shard_size=args.shard_size)
        r = time_pass(cached, workers=w, shuffle=False, batch_size=args.batch_size, seed=args.seed, max_batches=None)
        status = cached.window_cache.status(verify=False)
        r["shards_complete"] = f"{status['shards_complete']}/{status['shards_total']}"
        r["ratio"] = ratio(r["windows_per_s"], bound)
        log(f"  {r['windows_per_s']} windows/s, ratio {r['ratio']}")
        runs.append(r)
    return runs


def cache_build(sub, args, bound: float | None, tmp: Path, log: Progress) -> dict:
    log("cache build (fill='eager')")
    with Timer() as t:
        sub.cache(str(tmp / "eager"), fill="eager", progress=False, shard_size=args.shard_size)
    r = rate(len(sub), t.seconds, rate_digits=3)
    r["ratio"] = ratio(r["windows_per_s"], bound)
    log(f"  {r['windows_per_s']} windows/s, ratio {r['ratio']}")
    return r


def describe_video(ds, ws, videos: list[Path], args) -> dict:
    """What was measured: backend, codec, GOP (asked, and measured on the store's keyframe flags), size, rate."""
    import av

    with av.open(str(videos[0])) as c:
        codec = c.streams.video[0].codec_context.name
    intervals = []
    for rid in ds.recording_ids:
        _, key = ds.store.video_index(rid, "video")
        kf = np.flatnonzero(np.asarray(key))
        if len(kf) > 1:
            intervals.extend(np.diff(kf).tolist())
    total_bytes = sum(p.stat().st_size for p in videos)
    return {"backend": ws.video_backend, "codec": codec, "encoder": "libx264", "gop": args.gop,
            "measured_keyframe_interval": round(float(np.mean(intervals)), 1) if intervals else None,
            "resolution": list(args.video_size), "fps": args.fps, "seconds_per_video": args.seconds,
            "videos": len(videos), "preset": args.preset, "crf": args.crf, "grain": args.grain,
            "mbit_per_s": round(total_bytes * 8 / (args.seconds * len(videos)) / 1e6, 2)}


# -- main ------------------------------------------------------------------------------------------------------------


def parse(argv: list[str] | None):
    p = parser(__doc__)
    p.add_argument("--videos", type=int, default=2)
    p.add_argument("--seconds", type=float, default=90.0, help="per video")
    p.add_argument("--video-size", type=int, nargs=2, default=[1920, 1080], metavar=("W", "H"))
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--gop", type=int, default=250, help="frames between keyframes (x264's default keyint)")
    p.add_argument("--preset", default="veryfast", help="x264 preset")
    p.add_argument("--crf", type=float, default=19.0,
                   help="x264 constant rate factor (19 with --grain 6: about 9 Mbit/s at 1080p30)")
    p.add_argument("--grain", type=int, default=6, help="per-pixel sensor grain amplitude (levels, uniform +-)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sec", type=float, default=5.0, help="window length")
    p.add_argument("--stride", type=float, default=1.0, help="window stride")
    p.add_argument("--frames", type=int, default=4, help="frames per window")
    p.add_argument("--size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts")
    p.add_argument("--orders", nargs="+", choices=sorted(ORDERS), default=["ordered", "shuffled"])
    p.add_argument("--cache-workers", type=int, nargs="+", default=[0],
                   help="worker counts of the cache's first (filling) epoch")
    p.add_argument("--shard-size", type=int, default=None, help="window cache shard size (default: the cache's)")
    p.add_argument("--max-windows", type=int, default=None,
                   help="time only the first ceil(K / batch size) loader batches; cache the first K windows")
    p.add_argument("--only", default=",".join(CASES), help=f"comma-separated cases among {','.join(CASES)}")
    p.add_argument("--backend", default="auto", help="video backend of the windows")
    p.add_argument("--work", default=None,
                   help="where the generated videos and store are kept (default: <temp dir>/mmloader-bench-video)")
    p.add_argument("--fresh", action="store_true", help="generate into a throwaway temp dir instead of --work")
    args = parse_args(p, SMOKE, argv)
    cases = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        p.error(f"--only: unknown case(s) {unknown}; choose among {list(CASES)}")
    args.cases = cases
    if args.max_windows is not None and args.max_windows < 1:
        p.error("--max-windows must be >= 1")
    return args


def run(work: Path, args, log: Progress) -> dict:
    src, store = source_and_store(work, args, log)
    videos = sorted((src / "v2" / "full_scale").glob("*.mp4"))
    ds = mmloader.open(store)
    ws = ds.windows(sec=args.sec, stride=args.stride, modalities=["imu", "video"], frames=args.frames,
                    size=tuple(args.size), video_backend=args.backend)
    k = len(ws) if args.max_windows is None else min(args.max_windows, len(ws))
    setup = {key: v for key, v in vars(args).items() if key != "cases"}
    result: dict = {"machine": machine(), "video": describe_video(ds, ws, videos, args),
                    "setup": {**setup, "cases": args.cases, "store": store}, "windows": len(ws),
                    "bound": None, "loader": [], "cache_first_epoch": [], "cache_build": None}
    log(f"{len(ws)} windows; backend {ws.video_backend}")
    bound = None
    if "bound" in args.cases:
        log("bound: decoding every frame once, in order")
        result["bound"] = sequential_bound(videos, len(ws))
        bound = result["bound"]["windows_per_s"]
        log(f"  {result['bound']['frames_per_s']} frames/s = {bound} windows/s")
    if "loader" in args.cases:
        result["loader"] = loader_cases(ws, args, bound, log)
    if {"cache", "build"} & set(args.cases):
        sub = ws if k == len(ws) else ws.filter(np.arange(len(ws)) < k)
        result["cache_windows"] = len(sub)
        with tempfile.TemporaryDirectory(prefix="caches-", dir=work) as tmp:
            if "cache" in args.cases:
                result["cache_first_epoch"] = cache_first_epochs(sub, args, bound, Path(tmp), log)
            if "build" in args.cases:
                result["cache_build"] = cache_build(sub, args, bound, Path(tmp), log)
    ratios = {f"loader_{'shuffled' if r['shuffle'] else 'ordered'}_w{r['workers']}": r["ratio"]
              for r in result["loader"]}
    ratios.update({f"cache_first_epoch_w{r['workers']}": r["ratio"] for r in result["cache_first_epoch"]})
    if result["cache_build"] is not None:
        ratios["cache_build"] = result["cache_build"]["ratio"]
    result["ratios"] = ratios
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    log = Progress()
    if args.fresh:
        with tempfile.TemporaryDirectory(prefix="mmloader-bench-video-") as tmp:
            result = run(Path(tmp), args, log)
    else:
        result = run(reused_dir(args.work, "mmloader-bench-video"), args, log)
    emit(result)


if __name__ == "__main__":
    main()
