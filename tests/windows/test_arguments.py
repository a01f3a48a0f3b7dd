"""Arguments of the public entry points: absurd numbers, wrong types, unknown names.

Each bad argument raises ValueError (TypeError for a type) naming the argument, within a second and without a
large allocation; the CLI reuses the same checks (one line on stderr, exit status 2); an unreachable store is one
line naming its URL.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

import mmloader
from mmloader.cli import main
from mmloader.windows import MAX_FRAMES_PER_WINDOW, MAX_SAMPLES_PER_WINDOW, WindowSpec, frames_held

ALLOWED_PEAK = 20 * 2**20  # bytes traced while a bad call is refused


@pytest.fixture(scope="module")
def ds(sample_store):
    ds = mmloader.open(sample_store(videos=3, seconds=12, seed=5, defect_fraction=0.5))
    ds.windows(sec=2, modalities=["imu", "video"])  # imports (torch...) and table reads happen before timing
    return ds


def refused_quickly(call, exc, match):
    tracemalloc.start()
    t = time.perf_counter()
    try:
        with pytest.raises(exc, match=match) as info:
            call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - t < 1.0
    assert peak < ALLOWED_PEAK, f"{peak / 2**20:.1f} MiB traced"
    return info.value


BAD = [
    (dict(sec=float("inf")), ValueError, r"^sec must be finite"),
    (dict(sec=float("nan")), ValueError, r"^sec must be finite"),
    (dict(sec=-1), ValueError, r"^sec must be > 0"),
    (dict(sec=1e300), ValueError, r"^sec must be > 0 and <= 86400"),
    (dict(sec=1e-6), ValueError, r"^sec=1e-06 is shorter than one sample.*1/imu_hz = 0.005 s"),
    (dict(sec="5"), TypeError, r"^sec must be a number, got str"),
    (dict(sec=True), TypeError, r"^sec must be a number"),
    (dict(sec=5, stride=0), ValueError, r"^stride must be >= 1e-09"),
    (dict(sec=5, stride=float("inf")), ValueError, r"^stride must be finite"),
    (dict(sec=5, stride=1e-9), ValueError, r"^stride=1e-09 would cut [\d,]+ windows .* at most 10,000,000"),
    (dict(sec=5, imu_hz=1e9), ValueError, r"^imu_hz must be > 0 and <= 1e\+06"),
    (dict(sec=5, imu_hz=0), ValueError, r"^imu_hz must be > 0"),
    (dict(sec=100, imu_hz=20_000), ValueError, r"^imu_hz=20000 with sec=100 asks 2,000,000 samples"),
    (dict(sec=5, anchor="center"), ValueError, r"^anchor must be 'tile' or 'events'"),
    (dict(sec=5, modalities=["imu", "video"], size=(0, 0)), ValueError, r"^size must be \(height, width\)"),
    (dict(sec=5, modalities=["imu", "video"], size=(-4, 8)), ValueError, r"^size must be"),
    (dict(sec=5, modalities=["imu", "video"], size=(10**6, 8)), ValueError, r"^size must be .*8192"),
    (dict(sec=5, modalities=["imu", "video"], size=(32.5, 8)), TypeError, r"^size must be \(height, width\), two integers"),
    (dict(sec=5, modalities=["imu", "video"], size=32), TypeError, r"^size must be"),
    (dict(sec=5, modalities=["imu", "video"], frames=0), ValueError, r"^frames must be >= 1"),
    (dict(sec=5, modalities=["imu", "video"], frames=-3), ValueError, r"^frames must be >= 1"),
    (dict(sec=5, modalities=["imu", "video"], frames=2.0), TypeError, r"^frames must be an integer"),
    (dict(sec=5, modalities=["imu", "video"], frames=100_000), ValueError, r"^frames must be >= 1 and <= 1000"),
    (dict(sec=5, modalities=["imu", "video"], frames=10**400), ValueError, r"^frames must be .*got 1000000.*\.\.\.$"),
    (dict(sec=5, modalities=["imu", "video"], frames=151), ValueError,
     r"^frames=151 asks 151 frames per window, but a 5 s window holds only 150 frame\(s\) of 'video' at 30 fps"),
    (dict(sec=5, modalities=["imu", "video"], video_fps=60), ValueError, r"^video_fps=60 asks 300 frames.*holds only 150"),
    (dict(sec=5, modalities=["imu", "video"], video_fps=0), ValueError, r"^video_fps must be > 0"),
    (dict(sec=5, modalities=["imu", "video"], video_fps=1e5), ValueError, r"^video_fps=100000 with sec=5 asks"),
    (dict(sec=5, modalities=["imu", "video"], frames=2, video_fps=2), ValueError, r"frames= or video_fps="),
    (dict(sec=5, modalities=["gaze"]), ValueError, r"unknown modality 'gaze'; this store has \['activities', 'imu'"),
    (dict(sec=5, modalities="gaze"), ValueError, r"unknown modality 'gaze'"),
    (dict(sec=5, modalities=[]), ValueError, r"^modalities is empty"),
    (dict(sec=5, modalities=["imu", "imu"]), ValueError, r"^modalities names 'imu' more than once"),
    (dict(sec=5, modalities=[3]), TypeError, r"^modalities must be strings"),
    (dict(sec=5, modalities=5), TypeError, r"^modalities must be a string or a sequence"),
    (dict(sec=5, split="Train"), ValueError, r"^split='Train' is not a split of .*; it has \['test', 'train', 'val'\]"),
    (dict(sec=5, split=1), TypeError, r"^split must be a string"),
    (dict(sec=5, max_masked_fraction=1.5), ValueError, r"^max_masked_fraction must be >= 0 and <= 1"),
    (dict(sec=5, max_masked_fraction=float("nan")), ValueError, r"^max_masked_fraction must be finite"),
    (dict(sec=5, video_tolerance_sec=-0.1), ValueError, r"^video_tolerance_sec must be >= 0"),
    (dict(sec=5, video_backend="ffmpeg"), ValueError, r"^video_backend must be one of auto, pyav"),
    (dict(sec=5, label_stream="nope"), ValueError, r"label_stream='nope' is not an events table .*'activities'"),
    (dict(sec=5, text_stream="nope", modalities=["imu", "text"]), ValueError, r"no 'nope' events"),
    (dict(sec=5, anchor="events", text_stream="nope"), ValueError, r"anchor='events' .*'nope' events"),
    (dict(sec=5, max_windows=0), ValueError, r"^max_windows must be a positive integer"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[repr(b[0]) for b in BAD])
def test_bad_window_arguments_are_refused_quickly_and_named(ds, kwargs, exc, match):
    refused_quickly(lambda: ds.windows(**kwargs), exc, match)


def test_the_bounds_themselves_are_accepted(ds):
    assert len(ds.windows(sec=5, modalities=["imu", "video"], frames=150)) > 0  # 5 s at 30 fps hold 150 frames
    assert len(ds.windows(sec=5, modalities=["imu", "video"], video_fps=30)) > 0
    assert ds.windows(sec=0.005, stride=2, modalities=["imu"]).spec.num_samples == 1  # one sample: the minimum
    assert ds.windows(sec=5, imu_hz=MAX_SAMPLES_PER_WINDOW / 5, stride=4).spec.num_samples == MAX_SAMPLES_PER_WINDOW
    ok = ds.windows(sec=2, stride=1, max_windows=100)
    with pytest.raises(ValueError, match=r"^stride=1 would cut \d+ windows .* at most 3 \(max_windows=\)"):
        ds.windows(sec=2, stride=1, max_windows=3)
    assert len(ok) > 3
    assert frames_held(5, 30) == 150 and frames_held(5, 29.97) == 149 and frames_held(0.01, 30) == 1
    assert MAX_FRAMES_PER_WINDOW == 1000


def test_one_string_is_one_modality(ds):
    one, listed = ds.windows(sec=2, modalities="imu"), ds.windows(sec=2, modalities=["imu"])
    assert one.spec == listed.spec and one.spec.modalities == ("imu",)
    assert one.index.equals(listed.index)
    spec = WindowSpec(sec=2, modalities="video", size=[32, 40])
    assert spec.modalities == ("video",) and spec.size == (32, 40) and hash(spec)


def test_splits_are_checked_against_the_store(ds):
    assert set(ds.splits) == {"train", "val", "test"}
    ws = ds.windows(sec=2, modalities=["imu"])
    total = sum(len(ws.split(s)) for s in ("train", "val", "test"))
    assert total == len(ws)  # an existing split with no windows is an empty set, not an error
    for call in (lambda: ws.split("Train"), lambda: ds.split("Train"), lambda: ds.windows(sec=2, split="Train")):
        refused_quickly(call, ValueError, r"split='Train' is not a split of .*\['test', 'train', 'val'\]")
    assert ds.split("train") and len(ds.windows(sec=2, split="train")) == len(ws.split("train"))


def test_recordings_and_filter_arguments(ds):
    ws = ds.windows(sec=2, modalities=["imu"])
    rid = ws.index["recording_id"][0].as_py()
    assert len(ws.recordings(rid)) == len(ws.recordings([rid])) > 0  # one string is one id
    with pytest.raises(ValueError, match=r"^ids: 1 recording\(s\) not in .*\['nope'\]"):
        ws.recordings([rid, "nope"])
    with pytest.raises(TypeError, match="recording ids"):
        ws.recordings([1])
    with pytest.raises(TypeError, match="bool mask"):
        ws.filter([0, 1])  # indices, not a mask
    with pytest.raises(ValueError, match="mask has shape"):
        ws.filter(np.ones(len(ws) + 1, bool))
    assert len(ws.filter(np.arange(len(ws)) == 0)) == 1


# -- the CLI: the same checks, one line, exit status 2 ------------------------------------------------------------

@pytest.mark.parametrize("args,match", [
    (["--sec", "inf"], "argument --sec: sec must be finite"),
    (["--imu-hz", "1e9"], "argument --imu-hz: imu_hz must be > 0 and <= 1e+06"),
    (["--size", "0", "0"], "argument --size: size must be (height, width)"),
    (["--split", "Train"], "argument --split: split='Train' is not a split of"),
    (["--frames", "100000"], "argument --frames: frames must be >= 1 and <= 1000"),
    (["--stride", "1e-9"], "argument --stride: stride=1e-09 would cut"),
    (["--backend", "ffmpeg"], "argument --backend: video_backend must be one of"),
    (["--modalities", "gaze"], "unknown modality 'gaze'"),
])
@pytest.mark.parametrize("command", [["windows"], ["cache", "build"]])
def test_cli_window_flags_use_the_same_checks(ds, capsys, command, args, match):
    extra = ["--epochs", "0"] if command == ["windows"] else ["-q"]
    assert main([*command, ds.url, *args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err and "Traceback" not in err
    assert err.startswith(f"mmloader {command[0]}: error: ")


def test_cli_good_flags_still_work(ds, capsys):
    assert main(["windows", ds.url, "--sec", "2", "--modalities", "imu", "--epochs", "0"]) == 0
    assert "WindowSet(" in capsys.readouterr().out


def test_cli_count_flags_are_checked_by_argparse(ds):
    for args in (["windows", ds.url, "--batch-size", "0"], ["windows", ds.url, "--workers", "-1"],
                 ["windows", ds.url, "--frames", "0"], ["cache", "build", ds.url, "--shard-size", "0"]):
        r = subprocess.run([sys.executable, "-m", "mmloader.cli", *args], capture_output=True, text=True)
        assert r.returncode == 2 and "must be >=" in r.stderr and "Traceback" not in r.stderr, args


# -- an unreachable store: one line naming the URL, quickly ---------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
def test_unreachable_s3_store_is_one_line_naming_the_url(tmp_path):
    pytest.importorskip("s3fs")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    opts = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    before = repr(opts)
    t = time.perf_counter()
    with pytest.raises(mmloader.errors.StoreUnreachableError) as info:
        mmloader.open("s3://bucket/some/store", storage_options=opts)
    assert time.perf_counter() - t < 10
    msg = str(info.value)
    assert msg.startswith("s3://bucket/some/store: cannot reach the storage") and endpoint in msg and "\n" not in msg
    assert isinstance(info.value, OSError) and isinstance(info.value, mmloader.MMLoaderError)
    assert info.value.__suppress_context__  # no chained 50-line botocore traceback
    assert repr(opts) == before  # the caller's storage_options are not modified
    with pytest.raises(mmloader.errors.StoreUnreachableError, match="cannot reach"):
        mmloader.Store("s3://bucket/some/store", **opts)
    # the CLI: exit 1, one line, no traceback (credentials and endpoint from the environment)
    env = {**__import__("os").environ, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
           "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    r = subprocess.run([sys.executable, "-m", "mmloader.cli", "info", "s3://bucket/some/store"], capture_output=True,
                       text=True, env=env, timeout=50)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "s3://bucket/some/store: cannot reach the storage" in r.stderr and endpoint in r.stderr


def test_user_retry_settings_are_kept_for_the_probe():
    from mmloader.fsutil import _fast_fail_fs, get_fs

    pytest.importorskip("s3fs")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    mine = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint},
            "config_kwargs": {"retries": {"max_attempts": 3}}}
    fs, _ = get_fs("s3://bucket/x", **mine)
    assert _fast_fail_fs(fs, mine) is fs  # configured retries: never overridden
    plain = {k: v for k, v in mine.items() if k != "config_kwargs"}
    fs, _ = get_fs("s3://bucket/x", **plain)
    probe = _fast_fail_fs(fs, plain)
    assert probe is not fs and probe.config_kwargs["retries"] == {"max_attempts": 1} and "config_kwargs" not in plain
