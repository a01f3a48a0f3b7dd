"""The Ego4D recipe on hand-built native trees: layout variants, IMU repairs, clear errors, no half stores."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import mmloader
from mmloader.recipes.ego4d.recipe import Ego4DAdapter
from mmloader.recipes.ego4d.imu import HEADER, read_imu_csv
from mmloader.recipes.ego4d.narration import clean_narration
from mmloader.errors import MediaError, SourceFormatError

from conftest import imu_rows, make_ego4d_tree, write_csv, write_mp4


def prepare(src, dst, **kw):
    return Ego4DAdapter().prepare(str(src), str(dst), progress=False, **kw)


def test_prepares_store_with_all_modalities(ego4d_tree, tmp_path):
    ds = mmloader.open(prepare(ego4d_tree, tmp_path / "store"))
    assert sorted(ds.recording_ids) == ["vid-a", "vid-b"]
    assert ds.modalities == ["imu", "narrations", "summaries", "video"]
    assert ds.splits == {"train": 1, "val": 1}
    ts = ds.timeseries("vid-a")
    assert ts.channels == ("accl_x", "accl_y", "accl_z", "gyro_x", "gyro_y", "gyro_z")  # accl first
    np.testing.assert_allclose(ts.data[:, 0], ts.t_ns / 1e9, atol=1e-5)  # accl_x was written as t_sec
    np.testing.assert_allclose(ts.data[0, 3:], [0.1, 0.2, 0.3], atol=1e-6)
    pts, key = ds.store.video_index("vid-a")
    assert pts.tolist() == [k * 100_000_000 for k in range(20)] and key[0]
    row = ds.store.stream_row("vid-a", "video")
    assert (row["width"], row["height"], row["codec"], row["rate_hz"]) == (64, 48, "h264", 10.0)
    assert os.path.isabs(row["uri"]) and row["uri"].endswith("vid-a.mp4")
    narr = ds.events("narrations").to_pylist()[0]
    assert narr["text_raw"] == "#C C walks along the corridor"
    assert narr["text"] == "The person walks along the corridor"
    assert narr["t_start_ns"] == 500_000_000
    summ = ds.events("summaries").to_pylist()[0]
    assert (summ["t_start_ns"], summ["t_end_ns"], summ["kind"]) == (0, 2_000_000_000, "summary")
    assert ds.validate() == []


@pytest.mark.parametrize("where", ["root", "v1"])
def test_finds_metadata_at_root_or_v1(ego4d_tree, tmp_path, where):
    meta = ego4d_tree / "v2" / "ego4d.json"
    if where == "root":
        shutil.move(meta, ego4d_tree / "ego4d.json")
    else:
        (ego4d_tree / "v1").mkdir()
        shutil.move(meta, ego4d_tree / "v1" / "ego4d.json")
    ds = mmloader.open(prepare(ego4d_tree, tmp_path / "store"))
    assert len(ds.recording_ids) == 2 and "imu" in ds.modalities


def test_missing_metadata_is_a_clear_error(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(SourceFormatError, match=r"src: no ego4d.json found \(expected ego4d.json at the root or under v2/ or v1/\)"):
        prepare(tmp_path / "src", tmp_path / "store")


def test_recordings_without_imu_or_narrations(tmp_path):
    src = make_ego4d_tree(tmp_path / "src", imu=False, narrations=False)
    ds = mmloader.open(prepare(src, tmp_path / "store"))
    assert ds.modalities == ["video"]
    assert all(r == ["video"] for r in ds.recordings["modalities"].to_pylist())


def test_has_imu_true_without_csv_is_reported(ego4d_tree, tmp_path):
    os.remove(ego4d_tree / "v2" / "imu" / "vid-b.csv")
    ds = mmloader.open(prepare(ego4d_tree, tmp_path / "store"))
    assert ds.recordings_with("imu") == ["vid-a"]
    assert any("has_imu true" in w for w in ds.report()["recordings"]["vid-b"]["warnings"])


def test_not_downloaded_videos_are_skipped_and_counted(ego4d_tree, tmp_path):
    meta = json.loads((ego4d_tree / "v2" / "ego4d.json").read_text())
    meta["videos"].append({"video_uid": "vid-z", "duration_sec": 3.0, "has_imu": True})
    (ego4d_tree / "v2" / "ego4d.json").write_text(json.dumps(meta))
    ds = mmloader.open(prepare(ego4d_tree, tmp_path / "store"))
    assert "vid-z" not in ds.recording_ids
    assert ds.report()["skipped"] == {"vid-z": "not downloaded (no mp4, no IMU CSV)"}


def messy_rows():
    """Clean 3 s at 200 Hz, then every documented defect injected."""
    rows = imu_rows(3.0)
    rows[10][2] = None                      # empty canonical, recoverable from the component clock
    rows[11][2] = "NULL"                    # literal NULL
    rows[12][1] = None; rows[12][2] = None  # nothing to recover from -> dropped
    rows[20][6] = None                      # empty accl_x -> dropped
    rows[21][6:9] = [None, None, None]
    rows[30], rows[31] = rows[31], rows[30]  # out of order
    rows[50:55] = rows[50:55][::-1]
    rows.insert(60, list(rows[60]))          # exact duplicate row
    dup = list(rows[70]); dup[6] = 99.0
    rows.insert(71, dup)                     # same timestamp, other values
    rows[100][2] = 1e12                      # absurd timestamp: recovered from the component clock
    rows[101][2] = -1e12; rows[101][1] = None  # absurd and unrecoverable -> dropped
    rows[110][7] = 1e9                       # absurd value -> dropped
    # a second component after a 1 s gap, with another device-clock offset
    rows += imu_rows(1.0, start_ms=4000.0, component=1, offset_ms=9e6)
    return rows


def test_messy_csv_is_repaired_and_every_fix_counted(tmp_path):
    path = write_csv(tmp_path / "messy.csv", messy_rows())
    imu = read_imu_csv(str(path), duration_sec=5.0)
    t = imu.t_ns
    assert np.all(np.diff(t) > 0) and np.isfinite(imu.data).all()
    r = imu.report
    assert r["rows_read"] == 600 + 2 + 200
    assert r["dropped"] == {"missing_timestamp": 1, "timestamp_outlier": 1, "missing_values": 2,
                            "duplicate_timestamp": 2, "value_outlier": 1}
    assert r["fixed"]["timestamp_recovered"] == 3
    assert r["fixed"]["reordered"] >= 2
    assert r["rows_kept"] == r["rows_read"] - sum(r["dropped"].values()) == t.size
    assert r["components"] == [0, 1]
    assert len(imu.gaps) == 1
    a, b = imu.gaps[0]
    assert a == pytest.approx(2_995_000_000) and b == 4_000_000_000
    # recovered rows carry their true time; the duplicate kept the first row's values
    assert 50_000_000 in t and 55_000_000 in t and 500_000_000 in t
    i = np.searchsorted(t, 70 * 5_000_000)
    assert imu.data[i, 0] == pytest.approx(0.35)


def test_messy_csv_through_the_recipe(ego4d_tree, tmp_path):
    write_csv(ego4d_tree / "v2" / "imu" / "vid-a.csv", messy_rows())
    meta = json.loads((ego4d_tree / "v2" / "ego4d.json").read_text())
    meta["videos"][0]["duration_sec"] = 5.0
    (ego4d_tree / "v2" / "ego4d.json").write_text(json.dumps(meta))
    ds = mmloader.open(prepare(ego4d_tree, tmp_path / "store"))
    ts = ds.timeseries("vid-a")
    assert np.all(np.diff(ts.t_ns) > 0) and not np.isnan(ts.data).any()
    gaps = ds.store.gaps.to_pylist()
    assert [(g["recording_id"], g["t_end_ns"]) for g in gaps] == [("vid-a", 4_000_000_000)]
    totals = ds.report()["totals"]
    assert totals["imu_rows_dropped"]["duplicate_timestamp"] == 2 and totals["imu_gaps"] == 1


def _assert_no_store(tmp_path):
    assert not (tmp_path / "store").exists()
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]
    with pytest.raises(mmloader.StoreFormatError):
        mmloader.open(str(tmp_path / "store"))


def test_wrong_csv_header(ego4d_tree, tmp_path):
    header = [h.replace("accl_", "acc_") for h in HEADER]
    write_csv(ego4d_tree / "v2" / "imu" / "vid-b.csv", imu_rows(1.0), header=header)
    with pytest.raises(SourceFormatError, match=r"vid-b.csv: header .*missing \['accl_x', 'accl_y', 'accl_z'\].*expected the header component_idx,"):
        prepare(ego4d_tree, tmp_path / "store")
    _assert_no_store(tmp_path)


def test_unparseable_csv_value(ego4d_tree, tmp_path):
    rows = imu_rows(1.0)
    rows[5][3] = "abc"
    write_csv(ego4d_tree / "v2" / "imu" / "vid-b.csv", rows)
    with pytest.raises(SourceFormatError, match=r"vid-b.csv: cannot parse.*gyro_x"):
        prepare(ego4d_tree, tmp_path / "store")
    _assert_no_store(tmp_path)


def test_truncated_mp4(ego4d_tree, tmp_path):
    mp4 = ego4d_tree / "v2" / "full_scale" / "vid-b.mp4"
    data = mp4.read_bytes()
    mp4.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(MediaError, match=r"vid-b.mp4: .*(truncated|cannot open)"):
        prepare(ego4d_tree, tmp_path / "store")
    _assert_no_store(tmp_path)


def test_truncated_faststart_mp4(ego4d_tree, tmp_path):
    """moov atom first (as in streamed files): the index survives truncation, the frames do not."""
    import av

    src = ego4d_tree / "v2" / "full_scale" / "vid-b.mp4"
    fast = tmp_path / "fast.mp4"
    with av.open(str(src)) as i, av.open(str(fast), "w", options={"movflags": "faststart"}) as o:
        s = o.add_stream_from_template(i.streams.video[0])
        for p in i.demux(i.streams.video[0]):
            if p.dts is not None:
                p.stream = s
                o.mux(p)
    data = fast.read_bytes()
    src.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(MediaError, match=r"vid-b.mp4: truncated"):
        prepare(ego4d_tree, tmp_path / "store")
    _assert_no_store(tmp_path)


def test_garbage_mp4(ego4d_tree, tmp_path):
    (ego4d_tree / "v2" / "full_scale" / "vid-a.mp4").write_bytes(os.urandom(5000))
    with pytest.raises(MediaError, match=r"vid-a.mp4: cannot open as media.*expected a playable mp4"):
        prepare(ego4d_tree, tmp_path / "store")
    _assert_no_store(tmp_path)


@pytest.mark.parametrize(
    "doc, pattern",
    [
        ('{"vid-a": {"narration_pass_1": {"narrations": [', r"narration.json: invalid JSON at line 1"),
        ('[]', r"narration.json: top level is a list \(expected an object keyed by video_uid\)"),
        ('{"vid-a": {"narration_pass_1": {"narrations": [{"timestamp_sec": "soon", "narration_text": "#C C x"}]}}}',
         r"narration.json: video vid-a narration_pass_1 narrations\[0\]: field 'timestamp_sec' is 'soon' \(expected a number"),
        ('{"vid-a": {"narration_pass_2": {"narrations": [{"timestamp_sec": 1.0}]}}}',
         r"narrations\[0\]: field 'narration_text' is None \(expected a string\)"),
        ('{"vid-a": {"narration_pass_1": {"summaries": [{"start_sec": 2, "end_sec": 1, "summary_text": "x"}]}}}',
         r"summaries\[0\]: end_sec 1.0 < start_sec 2.0"),
    ],
)
def test_malformed_narration_json(ego4d_tree, tmp_path, doc, pattern):
    (ego4d_tree / "v2" / "annotations" / "narration.json").write_text(doc)
    with pytest.raises(SourceFormatError, match=pattern):
        prepare(ego4d_tree, tmp_path / "store")
    _assert_no_store(tmp_path)


def test_errors_skip_leaves_bad_recording_out(ego4d_tree, tmp_path):
    (ego4d_tree / "v2" / "full_scale" / "vid-a.mp4").write_bytes(b"not a video")
    ds = mmloader.open(prepare(ego4d_tree, tmp_path / "store", errors="skip"))
    assert ds.recording_ids == ["vid-b"]
    assert "vid-a.mp4" in ds.report()["failed"]["vid-a"]


def test_video_pts_do_not_start_at_zero(tmp_path):
    """The pts index is read from the stream, never assumed to start at 0."""
    import av

    src = make_ego4d_tree(tmp_path / "src", uids=("v",))
    mp4 = src / "v2" / "full_scale" / "v.mp4"
    shifted = tmp_path / "shifted.mp4"
    with av.open(str(mp4)) as i, av.open(str(shifted), "w") as o:
        s = o.add_stream_from_template(i.streams.video[0])
        offset = int(1.5 / i.streams.video[0].time_base)
        for p in i.demux(i.streams.video[0]):
            if p.dts is not None:
                p.pts += offset
                p.dts += offset
                p.stream = s
                o.mux(p)
    shutil.copy(shifted, mp4)
    ds = mmloader.open(prepare(src, tmp_path / "store"))
    pts, _ = ds.store.video_index("v")
    assert pts[0] == pytest.approx(1.5e9, abs=1e6) and np.all(np.diff(pts) > 0)


def test_open_prepares_once_and_again_when_the_source_changes(ego4d_tree, tmp_path):
    cache = tmp_path / "cache"
    ds1 = mmloader.open("ego4d", root=ego4d_tree, cache=cache, progress=False)
    ds2 = mmloader.open("ego4d", root=ego4d_tree, cache=cache, progress=False)
    assert ds1.url == ds2.url and len(os.listdir(cache)) == 1
    write_mp4(ego4d_tree / "v2" / "full_scale" / "vid-c.mp4", seconds=1.0)
    ds3 = mmloader.open("ego4d", root=ego4d_tree, cache=cache, progress=False)
    assert ds3.url != ds1.url  # a new fingerprint: prepared again
    assert ds3.store.manifest["source_fingerprint"] != ds1.store.manifest["source_fingerprint"]


def test_open_dataset_name_without_root_is_explained():
    with pytest.raises(ValueError, match=r"needs root="):
        mmloader.open("ego4d")


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("#C C walks along the corridor", "The person walks along the corridor"),
        ("#O man X waves at C", "A man waves at the person"),
        ("#C C picks something #unsure", "The person picks something"),
        ("#summary C cooked in the kitchen", "The person cooked in the kitchen"),
        ("#O X hands C a cup", "Someone hands the person a cup"),
    ],
)
def test_clean_narration(raw, clean):
    assert clean_narration(raw) == clean
