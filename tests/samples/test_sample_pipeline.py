"""The generated sample through the real recipe: every injected defect repaired and counted."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import mmloader
from mmloader.samples import load_sample_manifest


@pytest.fixture(scope="module")
def sample(sample_store):
    params = dict(videos=4, seconds=12, seed=3, defect_fraction=0.5)
    return sample_store.source(**params), mmloader.open(sample_store(**params))


def test_sample_prepares_with_every_video(sample):
    root, ds = sample
    man = load_sample_manifest(root)
    videos = man["videos"]
    assert sorted(ds.recording_ids) == sorted(v["video_uid"] for v in videos)
    no_imu = [v["video_uid"] for v in videos if not v["has_imu"]]
    assert len(no_imu) == 1 and "imu" not in ds.recordings_with("imu")
    assert set(ds.recordings_with("imu")) == {v["video_uid"] for v in videos if v["has_imu"]}
    no_narr = [v["video_uid"] for v in videos if not v["has_narrations"]]
    assert all(uid not in ds.recordings_with("narrations") for uid in no_narr)
    assert set(ds.recordings_with("activities")) == {v["video_uid"] for v in videos}
    assert ds.validate() == []


def test_defects_are_repaired_and_counted(sample):
    root, ds = sample
    man = load_sample_manifest(root)
    report = ds.report()["recordings"]
    defective = [v for v in man["videos"] if v["defects"]]
    assert defective
    for v in man["videos"]:
        if not v["has_imu"]:
            continue
        uid = v["video_uid"]
        ts = ds.timeseries(uid)
        assert np.all(np.diff(ts.t_ns) > 0) and np.isfinite(ts.data).all()
        imu = report[uid]["imu"]
        assert imu["rows_kept"] == ts.t_ns.size == imu["rows_read"] - sum(imu["dropped"].values())
        gaps = [(g["t_start_ns"] / 1e9, g["t_end_ns"] / 1e9) for g in ds.store.gaps.to_pylist() if g["recording_id"] == uid]
        np.testing.assert_allclose(np.array(gaps).reshape(-1, 2), np.array(v["gaps_sec"]).reshape(-1, 2), atol=1e-6)
        if v in defective:
            rows = v["defect_rows"]
            assert imu["dropped"]["missing_values"] == sum(n for k, n in rows.items() if k.startswith("empty_accl"))
            assert imu["dropped"]["duplicate_timestamp"] == sum(n for k, n in rows.items() if k.endswith("duplicate"))
            assert imu["fixed"]["timestamp_recovered"] == rows["empty_timestamp"] + rows["null_timestamp"] + rows["time_outlier"]
            assert imu["fixed"]["reordered"] > 0
            assert len(imu["components"]) == len(v["gaps_sec"]) + 1
        else:
            assert imu["dropped"] == {} and imu["fixed"] == {}


def test_open_sample_generates_once(tmp_path):
    ds = mmloader.open("sample:ego4d", videos=3, seconds=10, cache=tmp_path, progress=False)
    assert len(ds.recording_ids) == 3 and {"imu", "video", "narrations"} <= set(ds.modalities)
    again = mmloader.open("sample:ego4d", videos=3, seconds=10, cache=tmp_path, progress=False)
    assert again.url == ds.url
    assert len(os.listdir(tmp_path)) == 1


def test_cli_sample_prepare_info(tmp_path):
    def run(*args):
        r = subprocess.run([sys.executable, "-m", "mmloader.cli", *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout

    run("sample", "ego4d", str(tmp_path / "d"), "--videos", "3", "--seconds", "10", "-q")
    out = run("prepare", "ego4d", str(tmp_path / "d"), str(tmp_path / "s"), "-q")
    assert "prepared 3 recordings" in out
    out = run("info", str(tmp_path / "s"))
    assert "recordings   3" in out and "activities" in out
