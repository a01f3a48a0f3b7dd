"""Bring your own dataset: numpy arrays + labels (+ a PyAV video) → store → windows → loader."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import mmloader
from mmloader.recipes.custom import InputError, Recording, TimeSeriesInput, find_gaps, write_store
from mmloader.errors import MediaError

from conftest import write_mp4

NS = 1_000_000_000
HZ = 50
CH = ["acc_x", "acc_y", "acc_z"]
UNITS = ["m/s^2"] * 3


def wrist(seconds: float = 60.0, gap: tuple[float, float] | None = (21.0, 24.0), t_origin_ns: int = 0):
    """A 3-axis accelerometer at 50 Hz: x = t (s), y = sin(t), z = 9.81; samples with gap[0] <= t < gap[1]
    are missing."""
    k = np.arange(int(seconds * HZ))
    t_ns = t_origin_ns + k * (NS // HZ)
    t = k / HZ
    data = np.stack([t, np.sin(t), np.full_like(t, 9.81)], axis=1).astype(np.float32)
    if gap is not None:
        keep = ~((t >= gap[0]) & (t < gap[1]))
        t_ns, data = t_ns[keep], data[keep]
    return t_ns.astype(np.int64), data


LABELS = [(0, 30 * NS, "walking"), (30 * NS, 60 * NS, "running")]


@pytest.fixture
def store(tmp_path):
    t_ns, data = wrist()
    recs = [
        Recording(id="subject1", split="train", timeseries={"wrist": TimeSeriesInput(t_ns, data, CH, UNITS, 50.0)},
                  events={"labels": LABELS}, meta={"hand": "left"}),
        Recording(id="subject2", split="val",
                  timeseries={"wrist": TimeSeriesInput(*wrist(10.0, gap=None), CH, UNITS)},
                  events={"labels": [(0, 10 * NS, "sitting")]}),
    ]
    return write_store(tmp_path / "store", recs, dataset="wrist")


def test_store_tables_gaps_and_report(store):
    ds = mmloader.open(store)
    assert ds.name == "wrist" and sorted(ds.recording_ids) == ["subject1", "subject2"]
    assert ds.splits == {"train": 1, "val": 1}
    assert ds.validate() == []
    rows = {(r["recording_id"], r["stream"]): r for r in ds.streams.to_pylist()}
    w = rows[("subject1", "wrist")]
    assert w["kind"] == "timeseries" and w["rate_hz"] == 50.0 and w["channels"] == CH and w["units"] == UNITS
    assert w["n_samples"] == 60 * HZ - 3 * HZ and w["t_start_ns"] == 0
    assert rows[("subject2", "wrist")]["rate_hz"] == pytest.approx(50.0)  # measured when not given
    assert rows[("subject1", "labels")]["kind"] == "events"
    gaps = ds.store.gaps.to_pylist()
    assert gaps == [{"recording_id": "subject1", "stream": "wrist", "t_start_ns": 20_980_000_000,
                     "t_end_ns": 24_000_000_000}]
    ts = ds.timeseries("subject1", "wrist")
    assert ts.t_ns.dtype == np.int64 and ts.data.shape == (2850, 3)
    labels = ds.events("labels").to_pylist()
    assert [(r["recording_id"], r["text"], r["kind"]) for r in labels] == [
        ("subject1", "walking", "label"), ("subject1", "running", "label"), ("subject2", "sitting", "label")]
    rep = ds.report()["recordings"]["subject1"]
    assert rep["wrist"]["gaps"] == 1 and rep["wrist"]["measured_rate_hz"] == pytest.approx(50.0)
    assert rep["labels"] == {"events": 2}
    rec = {r["recording_id"]: r for r in ds.recordings.to_pylist()}
    assert rec["subject1"]["modalities"] == ["wrist", "labels"] and '"hand": "left"' in rec["subject1"]["meta_json"]
    assert rec["subject1"]["duration_ns"] == 60 * NS - NS // HZ


def test_windows_values_masks_and_loader_end_to_end(store):
    ds = mmloader.open(store)
    wins = ds.windows(sec=2, modalities=["wrist"], imu_hz=50)
    r = wins.report()
    # subject1 spans 0-59.98 s: 29 windows, [20, 22) and [22, 24) lie mostly in the gap; subject2 (0-9.98 s): 4
    assert r["candidates"] == 29 + 4 and r["dropped"] == {"wrist_gap": 2} and len(wins) == 31
    n_seen = 0
    for batch in wins.loader(batch_size=4):
        assert batch["wrist"].shape[1:] == (3, 100) and batch["wrist"].dtype == torch.float32
        assert batch["wrist_mask"].shape[1:] == (100,) and batch["wrist_mask"].all()
        for b in range(batch["wrist"].shape[0]):
            t = batch["t0"][b].item() + np.arange(100) / HZ
            x = batch["wrist"][b].numpy()
            np.testing.assert_allclose(x[0], t, atol=1e-4)
            np.testing.assert_allclose(x[1], np.sin(t), atol=1e-4)
            np.testing.assert_allclose(x[2], 9.81, atol=1e-5)
        n_seen += batch["wrist"].shape[0]
    assert n_seen == len(wins)

    # a window half inside the gap is kept when allowed, and masked (zeros) from the gap on
    lenient = ds.windows(sec=2, modalities=["wrist"], imu_hz=50, max_masked_fraction=0.6)
    i = [j for j in range(len(lenient)) if lenient[j]["recording_id"] == "subject1" and lenient[j]["t0"] == 20.0]
    assert len(i) == 1
    s = lenient[i[0]]
    mask = s["wrist_mask"].numpy()
    assert mask[:49].all() and not mask[50:].any()
    assert np.all(s["wrist"].numpy()[:, 50:] == 0)


def test_labels_as_window_text(store):
    ds = mmloader.open(store)
    wins = ds.windows(sec=2, modalities=["wrist", "text"], text_stream="labels", imu_hz=50)
    texts = {(wins[i]["recording_id"], wins[i]["t0"]): wins[i]["text"] for i in range(len(wins))}
    assert texts[("subject1", 0.0)] == ["walking"] and texts[("subject1", 30.0)] == ["running"]


def test_video_with_timeseries(tmp_path):
    mp4 = write_mp4(tmp_path / "cam.mp4", seconds=4.0, fps=10)
    t_ns, data = wrist(4.0, gap=None)
    url = write_store(tmp_path / "store", [Recording(
        id="r1", timeseries={"wrist": TimeSeriesInput(t_ns, data, CH, UNITS)}, videos={"video": mp4})])
    ds = mmloader.open(url)
    row = [r for r in ds.streams.to_pylist() if r["stream"] == "video"][0]
    assert row["uri"] == str(mp4) and row["n_samples"] == 40 and (row["width"], row["height"]) == (64, 48)
    pts, key = ds.store.video_index("r1", "video")
    assert pts[0] == 0 and pts[-1] == 3_900_000_000 and key[0]
    wins = ds.windows(sec=1, modalities=["wrist", "video"], imu_hz=50, frames=2)
    assert len(wins) >= 3
    s = wins[1]
    assert s["video"].shape == (2, 3, 48, 64) and s["wrist"].shape == (3, 50)
    t = s["t0"] + s["video_t"].numpy()
    assert np.all((t >= s["t0"]) & (t < s["t1"]))
    # frame k of write_mp4 has brightness ~5k: the frame at t0 + 0.25 s is frame 10 * t0 + 2
    k = int(round(t[0] * 10))
    assert abs(float(s["video"][0].float().mean()) - 5 * k) < 4


def test_find_gaps():
    t = np.array([0, 10, 20, 30, 100, 110], dtype=np.int64)
    assert find_gaps(t, 5.0) == [(30, 100)]
    assert find_gaps(t, 10.0) == []


@pytest.mark.parametrize("make, match", [
    (lambda t, x: TimeSeriesInput(t / 1e9, x, CH, UNITS), "integer nanoseconds"),
    (lambda t, x: TimeSeriesInput(t, x[:, 0], CH, UNITS), "2-D"),
    (lambda t, x: TimeSeriesInput(t, x[:-1], CH, UNITS), "rows"),
    (lambda t, x: TimeSeriesInput(t, x, CH[:2], UNITS), "3 columns but 2 channels"),
    (lambda t, x: TimeSeriesInput(t[::-1].copy(), x, CH, UNITS), "strictly increasing"),
    (lambda t, x: TimeSeriesInput(np.r_[t[:5], t[4:-1]], x, CH, UNITS), r"t_ns\[4\]"),
    (lambda t, x: TimeSeriesInput(t, np.where(np.arange(len(t))[:, None] == 7, np.nan, x), CH, UNITS), "NaN"),
    (lambda t, x: TimeSeriesInput(t, x, CH, UNITS, rate_hz=-1), "rate_hz"),
    (lambda t, x: TimeSeriesInput(t, x.astype(str), CH, UNITS), "numeric"),
])
def test_bad_timeseries_is_refused_naming_recording_and_stream(tmp_path, make, match):
    t, x = wrist(2.0, gap=None)
    with pytest.raises(InputError, match=match) as e:
        write_store(tmp_path / "s", [Recording(id="rec-7", timeseries={"wrist": make(t, x)})])
    assert "rec-7" in str(e.value) and "wrist" in str(e.value)
    assert not (tmp_path / "s").exists() and os.listdir(tmp_path) == []


def test_bad_recordings_events_and_media(tmp_path):
    t, x = wrist(2.0, gap=None)
    ts = {"wrist": TimeSeriesInput(t, x, CH, UNITS)}
    with pytest.raises(InputError, match="appears twice"):
        write_store(tmp_path / "s", [Recording(id="a", timeseries=ts), Recording(id="a", timeseries=ts)])
    with pytest.raises(InputError, match="no time series and no video"):
        write_store(tmp_path / "s", [Recording(id="a", events={"labels": LABELS})])
    with pytest.raises(InputError, match="recording id"):
        write_store(tmp_path / "s", [Recording(id="a/b", timeseries=ts)])
    with pytest.raises(InputError, match="reserved"):
        write_store(tmp_path / "s", [Recording(id="a", timeseries={"text": ts["wrist"]})])
    with pytest.raises(InputError, match=r"t_end_ns .* < t_start_ns"):
        write_store(tmp_path / "s", [Recording(id="a", timeseries=ts, events={"labels": [(5, 1, "x")]})])
    with pytest.raises(InputError, match="integer nanoseconds"):
        write_store(tmp_path / "s", [Recording(id="a", timeseries=ts, events={"labels": [(0.5, 1.0, "x")]})])
    with pytest.raises(InputError, match="is video here but timeseries"):
        write_store(tmp_path / "s", [Recording(id="a", timeseries=ts),
                                     Recording(id="b", videos={"wrist": tmp_path / "x.mp4"})])
    with pytest.raises(MediaError, match="missing.mp4"):
        write_store(tmp_path / "s", [Recording(id="a", timeseries=ts, videos={"video": tmp_path / "missing.mp4"})])
    assert os.listdir(tmp_path) == []
    url = write_store(tmp_path / "s", [Recording(id="a", timeseries=ts)])
    with pytest.raises(FileExistsError):
        write_store(url, [Recording(id="a", timeseries=ts)])
    assert write_store(url, [Recording(id="b", timeseries=ts)], overwrite=True) == url
    assert mmloader.open(url).recording_ids == ["b"]
