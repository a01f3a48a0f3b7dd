"""``mmloader bench``: on generated Ego4D-like data (--synthetic --smoke) and on an existing store, JSON on stdout
with the video described (codec, GOP, resolution) and positive ratios to the bound, a table on stderr, and one-line
usage errors (exit 2) for a store that cannot be benchmarked."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np

from mmloader.bench import SMOKE
from mmloader.bench.synthetic import profile_available
from mmloader.cli import main
from mmloader.recipes.custom import Recording, TimeSeriesInput, write_store


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmloader.cli", "bench", *args], capture_output=True, text=True,
                          timeout=240)


def check_ratios(out: dict) -> None:
    assert out["ratios"] and all(isinstance(r, float) and math.isfinite(r) and r > 0 for r in out["ratios"].values())


def test_synthetic_smoke(tmp_path):
    r = bench("--synthetic", "--smoke", "--fresh", "--output", str(tmp_path / "out.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out == json.loads((tmp_path / "out.json").read_text())
    assert {"machine", "video", "setup", "windows", "bound", "loader", "cache_first_epoch", "cache_build",
            "ratios"} <= out.keys()
    v = out["video"]
    assert v["codec"] == "h264" and v["gop"] == SMOKE["gop"] == v["measured_keyframe_interval"]
    assert v["resolution"] == SMOKE["video_size"] and v["backend"] == "pyav"
    assert out["windows"] > 0 and out["bound"]["frames"] == SMOKE["seconds"] * SMOKE["fps"]
    check_ratios(out)
    assert {"loader_ordered_w0", "loader_shuffled_w0", "cache_first_epoch_w0", "cache_build_w0"} <= out["ratios"].keys()
    if "profile" in out:  # the Ego4D recipe has transcode profiles: the short-GOP store was read too
        assert out["profile"]["video"]["gop"] <= 10 and out["profile_shuffled_gain"] > 0
        assert {"profile_ordered_w0", "profile_shuffled_w0"} <= out["ratios"].keys()
    else:
        assert any(n.startswith("profile: skipped") for n in out["notes"])
    table = r.stderr[r.stderr.index("machine "):]
    assert "h264 320x240" in table and "GOP 30" in table and "loader ordered, 0 workers" in table


def test_on_a_store(sample_store, tmp_path, capsys):
    store = sample_store()
    rc = main(["bench", store, "--smoke", "--max-windows", "4", "--only", "bound,loader,build",
               "--output", str(tmp_path / "out.json")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    out = json.loads(captured.out)
    assert out == json.loads((tmp_path / "out.json").read_text())
    v = out["video"]
    assert v["codec"] == "h264" and v["resolution"] == [160, 120] and v["gop"] >= 1 and v["videos"] >= 1
    assert out["bound"]["frames"] == v["frames"] > 0  # every frame of the videos the windows reference
    assert out["setup"]["store"] == store and "gop" not in out["setup"] and out["cache_build"][0]["windows"] == 4
    assert [(r["shuffle"], r["workers"], r["windows"]) for r in out["loader"]] == [(False, 0, 4), (True, 0, 4)]
    check_ratios(out)
    assert "h264 160x120" in captured.err and "cache build" in captured.err


def test_store_errors_are_one_line_exit_2(sample_store, tmp_path, capsys):
    missing = tmp_path / "no-such-store"
    r = bench(str(missing))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and str(missing) in r.stderr and "mmloader bench: error" in r.stderr
    t_ns = np.arange(2000, dtype=np.int64) * 5_000_000
    imu = TimeSeriesInput(t_ns, np.zeros((2000, 3), np.float32), ["x", "y", "z"], ["m/s^2"] * 3, 200.0)
    no_video = write_store(tmp_path / "imu-only", [Recording(id="r", timeseries={"imu": imu})], dataset="wrist")
    assert main(["bench", no_video, "--smoke"]) == 2
    err = capsys.readouterr().err
    assert "no video stream 'video'" in err and str(no_video) in err
    assert main(["bench", sample_store(), "--only", "profile"]) == 2
    assert "needs --synthetic" in capsys.readouterr().err
    assert main(["bench"]) == 2 and "give a STORE or --synthetic" in capsys.readouterr().err
    if profile_available():  # an unknown transcode profile is refused before anything is generated
        assert main(["bench", "--synthetic", "--smoke", "--profile", "no-such-profile"]) == 2
        assert "unknown video profile 'no-such-profile'" in capsys.readouterr().err
