"""Frame exactness (issue 13): every video frame a window returns — through a decode plan (index order) or by random
access (shuffled, or a window read alone) — is the frame PyAV finds nearest the requested time, with its true pts.

Fixtures: 96x64 files of 200 frames whose frame ``k`` shows ``k`` in binary (eight vertical bars, dark = 0, bright =
1), so a wrong frame is caught without trusting any decoder; written with PyAV at pts chosen here:

- ``h264``: libx264, one keyframe every 120 frames (no scene cuts), B-frames on, 25 fps, first pts 0.5 s (not 0);
- ``vp9``: libvpx-vp9 with alt-ref frames, one keyframe every 150 frames, variable frame rate (each period drawn in
  [24, 56] ms), first pts 0.1 s;

with 50-Hz IMU over [0, 10] s so that windows can be cut. The truth for each file is what PyAV's sequential decode of
every frame gives: (pts in ns, RGB frame, at native size and after the same resize the windows ask for); it is
checked against what was written (pts) and drawn (frame numbers). For each window and frame slot, the requested time
is ``t0 + (k + 1/2) * sec / frames`` (``WindowSpec.frame_offsets_ns``: centres of equal parts), the expected frame is
the one whose pts is nearest (ties: the earlier frame, as ``mmloader.video.select.nearest_frames`` documents), and
the sample must hold exactly that frame in ``video`` (bit-exact where the decoder is PyAV's or at native size; at
another size decord and torchcodec scale differently, so there the drawn frame number decides, and the frame must be
closer to the expected reference frame than to the three either side of it) and its pts in ``video_t`` (float32
seconds since ``t0``, as the sample documents). The H.264 windows are placed so that requested times fall exactly
halfway between two frames, a quarter period either side of halfway, and exactly on a frame.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

import mmloader
from mmloader.recipes.custom import Recording, TimeSeriesInput, write_store
from mmloader.video.backends import backend_problems

NS = 1_000_000_000
W, H = 96, 64  # width, height of the files
N = 200  # frames per file (< 256: a frame number fits the eight bars)
RESIZED = (40, 60)  # (height, width): a non-integer scale, done inside the decoder
REQUIRE_TORCHCODEC = os.environ.get("MMLOADER_REQUIRE_TORCHCODEC") == "1"


def frame_image(k: int) -> np.ndarray:
    """Frame ``k``: bit ``b`` of ``k`` as bar ``b`` (12 px wide; 40 = 0, 215 = 1), a top stripe of red ``7k``."""
    img = np.empty((H, W, 3), np.uint8)
    for b in range(8):
        img[:, 12 * b:12 * (b + 1)] = 215 if (k >> b) & 1 else 40
    img[:8, :, 0] = (7 * k) % 256
    return img


def frame_numbers(frames: np.ndarray) -> np.ndarray:
    """The frame numbers drawn in ``frames`` (F, h, w, 3) uint8, at any size: the middle half of each bar, below
    the top stripe, bright or not."""
    h, w = frames.shape[1:3]
    bits = [frames[:, h // 4:, round((b + 0.25) * w / 8):round((b + 0.75) * w / 8)].mean(axis=(1, 2, 3)) > 127.5
            for b in range(8)]
    return sum(bit.astype(np.int64) << b for b, bit in enumerate(bits))


def write_video(path, codec: str, pts: np.ndarray, time_base: Fraction, options: dict[str, str]) -> str:
    """Frame ``k`` (``frame_image``) at pts ``pts[k]`` ticks of ``time_base``, encoded by PyAV into an mp4."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=25, options=options)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.time_base = s.codec_context.time_base = time_base
        for k, p in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(frame_image(k), format="rgb24")
            frame.pts, frame.time_base = int(p), time_base
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return str(path)


def to_ns(ticks: int, time_base: Fraction) -> int:
    """``ticks × time_base`` in ns, rounded to nearest (halves up)."""
    return math.floor(Fraction(ticks) * time_base * NS + Fraction(1, 2))


@dataclass
class Reference:
    """PyAV's sequential decode of every frame: pts (N,) int64 ns; frames {size: (N, h, w, 3) uint8}."""

    pts_ns: np.ndarray
    frames: dict


def decode_all(path: str) -> Reference:
    """Every frame, in presentation order, at native size and at ``RESIZED`` (PyAV's scaler, as the windows')."""
    pts, native, small = [], [], []
    with av.open(path) as c:
        stream = c.streams.video[0]
        tb = Fraction(stream.time_base.numerator, stream.time_base.denominator)
        for f in c.decode(stream):
            pts.append(to_ns(f.pts, tb))
            native.append(f.to_ndarray(format="rgb24"))
            small.append(f.to_ndarray(format="rgb24", width=RESIZED[1], height=RESIZED[0]))
    return Reference(np.array(pts, np.int64), {None: np.stack(native), RESIZED: np.stack(small)})


@dataclass
class Case:
    """One file and the windows cut from it."""

    name: str
    codec: str  # also the id of the store's one recording
    url: str  # the store
    written_ns: np.ndarray  # the pts the file was written with, ns
    ref: Reference
    window_args: dict
    gop: int


CASES = {  # name -> (codec, window arguments)
    # t0 steps 13.25 frame periods: the requested times cycle through exact ties (halfway between two frames), a
    # quarter period either side of halfway, and exactly on a frame
    "h264": ("h264", dict(sec=2.0, stride=0.53, frames=10)),
    "vp9-vfr": ("vp9", dict(sec=2.0, stride=0.45, frames=8, video_tolerance_sec=0.5)),
}


def _make_file(codec: str, tmp) -> tuple[str, np.ndarray, int]:
    """(mp4 path, written pts in ns, keyframe interval) of the ``codec`` fixture (module docstring)."""
    if codec == "h264":
        tb, gop = Fraction(1, 12800), 120
        pts = 6400 + 512 * np.arange(N)  # 40 ms apart from 0.5 s
        path = write_video(tmp / "h264.mp4", "libx264", pts, tb, {
            "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": "3", "preset": "veryfast"})
    else:
        tb, gop = Fraction(1, 90000), 150
        periods = np.random.default_rng(7).integers(2160, 5040, N - 1)  # 24..56 ms
        pts = np.cumsum(np.r_[9000, periods])
        path = write_video(tmp / "vp9.mp4", "libvpx-vp9", pts, tb, {
            "g": str(gop), "deadline": "good", "cpu-used": "5", "auto-alt-ref": "1", "lag-in-frames": "16"})
    return path, np.array([to_ns(int(p), tb) for p in pts], np.int64), gop


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{codec: (store URL, written pts ns, reference decode, gop)}: one store per file."""
    out = {}
    for codec in ("h264", "vp9"):
        tmp = tmp_path_factory.mktemp(f"exact-{codec}")
        path, written, gop = _make_file(codec, tmp)
        t = np.arange(501, dtype=np.int64) * 20_000_000  # 50 Hz over [0, 10] s
        imu = TimeSeriesInput(t, np.random.default_rng(1).standard_normal((len(t), 6)).astype(np.float32),
                              [f"c{j}" for j in range(6)], ["u"] * 6, rate_hz=50.0)
        url = write_store(str(tmp / "store"), [Recording(id=codec, timeseries={"imu": imu}, videos={"video": path})],
                          dataset=f"exact-{codec}")
        out[codec] = (url, written, decode_all(path), gop)
    return out


@pytest.fixture(scope="module", params=list(CASES))
def case(request, files) -> Case:
    codec, args = CASES[request.param]
    url, written, ref, gop = files[codec]
    return Case(request.param, codec, url, written, ref, args, gop)


def _backend(name: str):
    """A backend that cannot decode here is skipped, saying why (torchcodec runs where CI requires it)."""
    why = backend_problems([name])[name]
    if why is None or (name == "torchcodec" and REQUIRE_TORCHCODEC):
        return name
    return pytest.param(name, marks=pytest.mark.skip(reason=f"{name} cannot decode here: {why}"))


BACKENDS = [_backend(b) for b in ("pyav", "decord", "torchcodec")]
SIZES = pytest.mark.parametrize("size", [None, RESIZED], ids=["native", "resized"])


def make_windows(case: Case, backend: str, size):
    """The case's windows (IMU + video) decoded by ``backend`` at ``size`` ((H, W), None: native)."""
    return mmloader.open(case.url).windows(modalities=["imu", "video"], size=size, video_backend=backend,
                                           **case.window_args)


def expected_frames(pts_ns: np.ndarray, targets_ns: np.ndarray) -> np.ndarray:
    """Index of the frame nearest each target, ties to the earlier frame (by brute force, not the library's rule)."""
    dist = np.abs(pts_ns[None, :] - targets_ns[:, None])
    return dist.argmin(axis=1)  # the first of equal minima: the earlier frame (pts ascending)


def expected_t0s(case: Case) -> np.ndarray:
    """Tile starts over the span both streams cover: video [first pts, last pts], IMU [0, 10] s."""
    start, end = max(0, int(case.ref.pts_ns[0])), min(10 * NS, int(case.ref.pts_ns[-1]))
    sec, stride = round(case.window_args["sec"] * NS), round(case.window_args["stride"] * NS)
    return start + stride * np.arange((end - start - sec) // stride + 1, dtype=np.int64)


def check_window(case: Case, ws, i: int, frames, times, size) -> np.ndarray:
    """Window ``i``'s frames (F, 3, h, w) uint8 and ``video_t`` (F,) float32 are the nearest frames to the requested
    times, with their true pts; returns the expected frame indices."""
    t0 = int(ws.index["t0_ns"][i].as_py())
    sec_ns, n = round(case.window_args["sec"] * NS), case.window_args["frames"]
    targets = t0 + np.round((np.arange(n) + 0.5) * (sec_ns / n)).astype(np.int64)
    want = expected_frames(case.ref.pts_ns, targets)
    got = frames.numpy().transpose(0, 2, 3, 1)
    ref = case.ref.frames[size]
    assert got.dtype == np.uint8 and got.shape == (n, *(size or (H, W)), 3), got.shape
    assert frame_numbers(got).tolist() == want.tolist(), f"window {i}: wrong frames"
    if size is None or ws.video_backend == "pyav":
        assert np.array_equal(got, ref[want]), f"window {i}: pixels differ from PyAV's decode of the same frames"
    else:  # another scaler: close to the expected frame, and closer to it than to the frames around it
        near = np.clip(want[:, None] + np.arange(-3, 4)[None, :], 0, len(ref) - 1)  # (F, 7), the expected at 3
        dist = np.abs(got[:, None].astype(np.int16) - ref[near].astype(np.int16)).mean(axis=(2, 3, 4))
        assert np.all(dist[:, 3] < 4), f"window {i}: far from the expected frame"
        assert np.all((dist[:, 3:4] < dist) | (near == want[:, None])), f"window {i}: closer to another frame"
    true_t = (case.ref.pts_ns[want] - t0) / NS
    assert times.dtype == torch.float32 and np.array_equal(times.numpy(), true_t.astype(np.float32)), f"window {i}"
    assert np.all(np.abs(times.numpy().astype(np.float64) - true_t) < 1e-6)  # float32 seconds: within 1 us
    return want


def pyav_reader(ws):
    """The one open reader of ``ws`` in this process."""
    (reader,) = list(ws.readers._readers.values())
    return reader


# -- the fixtures are what they claim -------------------------------------------------------------------------
def test_the_files_are_long_gop_and_the_reference_is_what_was_written(case):
    ref = case.ref
    assert len(ref.pts_ns) == N and np.all(np.diff(ref.pts_ns) > 0)
    assert np.array_equal(ref.pts_ns, case.written_ns)  # true pts: as written
    assert frame_numbers(ref.frames[None]).tolist() == list(range(N))  # frame k shows k
    assert frame_numbers(ref.frames[RESIZED]).tolist() == list(range(N))
    ws = make_windows(case, "pyav", None)
    pts, key = ws._pts(case.codec, "video")
    assert np.array_equal(pts, ref.pts_ns)  # the store's index is the decoder's truth
    assert np.flatnonzero(key).tolist() == list(range(0, N, case.gop))
    assert ref.pts_ns[0] > 0  # a non-zero first pts
    if case.name == "h264":  # ties, exact hits and plain nearest frames on either side all occur
        t = (ws.index["t0_ns"].to_numpy()[:, None] + ws.spec.frame_offsets_ns()[None, :]).ravel()
        phase = (t - ref.pts_ns[0]) % 40_000_000
        assert {0, 10_000_000, 20_000_000, 30_000_000} == set(phase.tolist())
    if case.name == "vp9-vfr":
        assert len(set(np.diff(ref.pts_ns).tolist())) > 20  # irregular frame times


def test_windows_are_the_expected_tiles(case):
    """Every tile over the covered span is kept (none dropped), so every window below is checked."""
    ws = make_windows(case, "pyav", None)
    assert ws.index["t0_ns"].to_numpy().tolist() == expected_t0s(case).tolist() and len(ws) >= 12
    assert np.array_equal(ws.spec.frame_offsets_ns(), np.round(
        (np.arange(case.window_args["frames"]) + 0.5) * (ws.spec.sec_ns / case.window_args["frames"])))


# -- the plan path: index order --------------------------------------------------------------------------------
@SIZES
@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_path_returns_the_nearest_frames(case, backend, size):
    """Iteration and a ``shuffle=False`` loader: one announced run, every window from one forward pass."""
    base = make_windows(case, backend, size)
    ws = pickle.loads(pickle.dumps(base))
    for s in ws:
        check_window(case, ws, s["index"], s["video"], s["video_t"], size)
    assert ws._plan.run is not None and ws._plan.ptr == len(ws)  # every read followed the announced run
    assert ws._plan.store.peak_bytes > 0  # and later windows' frames were kept, decoded with earlier ones
    if backend == "pyav":
        reader = pyav_reader(ws)
        assert reader.backward_seeks == 0 and reader.frames_decoded <= N
    ws = pickle.loads(pickle.dumps(base))
    n = 0
    for batch in ws.loader(batch_size=5, shuffle=False):
        for b, i in enumerate(batch["index"].tolist()):
            assert i == n
            check_window(case, ws, i, batch["video"][b], batch["video_t"][b], size)
            n += 1
    assert n == len(ws)
    if backend == "pyav":
        assert pyav_reader(ws).backward_seeks == 0


# -- the random-access path: shuffled, or each window alone ----------------------------------------------------
@SIZES
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_access_returns_the_nearest_frames(case, backend, size):
    """A shuffled order (never ``i`` right after ``i - 1``: no plan), and each window read alone in a fresh WindowSet
    (in reverse order)."""
    base = make_windows(case, backend, size)
    order = [int(i) for i in np.random.default_rng(3).permutation(len(base))]
    order = [i for k, i in enumerate(order) if k == 0 or i != order[k - 1] + 1]
    ws = pickle.loads(pickle.dumps(base))
    for i in order:
        s = ws[i]
        check_window(case, ws, i, s["video"], s["video_t"], size)
    assert len(ws._plan.store) == 0  # nothing decoded ahead
    if backend == "pyav":
        assert pyav_reader(ws).backward_seeks > 0
    for i in reversed(range(len(base))):
        alone = pickle.loads(pickle.dumps(base))
        s = alone[i]
        check_window(case, alone, i, s["video"], s["video_t"], size)
