"""Source validation (issue 11, item 5): repeated recording ids, unsafe ids, non-finite or absurd numbers in
source files (named by file and field, obeying --errors skip), and write_store on any iterable."""

from __future__ import annotations

import gc
import json
import os
import weakref

import numpy as np
import pytest

import mmloader
from mmloader import cli
from mmloader.recipes.ego4d.recipe import Ego4DAdapter, check_metadata
from mmloader.recipes.ego4d.imu import read_imu_csv
from mmloader.recipes.custom import InputError, Recording, TimeSeriesInput, write_store
from mmloader.errors import SourceFormatError

from conftest import imu_rows, make_ego4d_tree, write_csv

NS = 1_000_000_000


def prepare(src, dst, **kw):
    return Ego4DAdapter().prepare(str(src), str(dst), progress=False, **kw)


def meta_path(src):
    return src / "v2" / "ego4d.json"


def edit_meta(src, fn):
    doc = json.loads(meta_path(src).read_text())
    fn(doc)
    meta_path(src).write_text(json.dumps(doc))  # allow_nan: writes NaN / Infinity literals, as a broken file may


def edit_narrations(src, fn):
    p = src / "v2" / "annotations" / "narration.json"
    doc = json.loads(p.read_text())
    fn(doc)
    p.write_text(json.dumps(doc))


def assert_no_store(tmp_path):
    assert not (tmp_path / "store").exists()
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]


@pytest.fixture
def tree(tmp_path):
    return make_ego4d_tree(tmp_path / "src", uids=("vid-a", "vid-b", "vid-c"))


# -- repeated video_uid ----------------------------------------------------------------------------------
def duplicate_b(doc, same=False):
    copy = dict(doc["videos"][1])
    if not same:
        copy["split_fho"] = "test"  # the leak: vid-b in val and in test
    doc["videos"].append(copy)


def test_duplicate_video_uid_is_refused_naming_file_field_and_uid(tree, tmp_path):
    edit_meta(tree, duplicate_b)
    with pytest.raises(SourceFormatError, match=r"ego4d.json: videos\[3\]: field 'video_uid' 'vid-b' is also the "
                                                r"video_uid of videos\[1\]") as e:
        prepare(tree, tmp_path / "store")
    assert str(meta_path(tree)) in str(e.value)
    assert_no_store(tmp_path)


def test_identical_duplicates_are_refused_too_by_default(tree, tmp_path):
    edit_meta(tree, lambda d: duplicate_b(d, same=True))
    with pytest.raises(SourceFormatError, match="'vid-b' is also the video_uid"):
        prepare(tree, tmp_path / "store")


def test_duplicate_video_uid_under_skip_drops_every_copy_and_reports_it(tree, tmp_path):
    edit_meta(tree, duplicate_b)
    ds = mmloader.open(prepare(tree, tmp_path / "store", errors="skip"))
    ids = ds.recordings["recording_id"].to_pylist()
    assert sorted(ids) == ["vid-a", "vid-c"] and len(ids) == len(set(ids))  # nobody in two splits
    rep = ds.report()
    assert "listed 2 times" in rep["failed"]["vid-b"] and "different contents" in rep["failed"]["vid-b"]
    assert "all copies left out" in rep["duplicates"]["vid-b"]
    assert rep["totals"]["duplicates"] == 1 and rep["totals"]["failed"] == 1
    assert "vid-b" not in set(ds.events("narrations")["recording_id"].to_pylist())
    assert not os.path.exists(os.path.join(ds.url, "timeseries", "vid-b"))


def test_identical_duplicates_under_skip_keep_one_copy(tree, tmp_path):
    edit_meta(tree, lambda d: duplicate_b(d, same=True))
    ds = mmloader.open(prepare(tree, tmp_path / "store", errors="skip"))
    ids = ds.recordings["recording_id"].to_pylist()
    assert sorted(ids) == ["vid-a", "vid-b", "vid-c"]
    assert ds.splits == {"train": 1, "val": 2}
    narr = ds.events("narrations").to_pylist()
    assert sum(r["recording_id"] == "vid-b" for r in narr) == 1  # not stored twice
    imu = [r for r in ds.streams.to_pylist() if r["stream"] == "imu" and r["recording_id"] == "vid-b"]
    assert len(imu) == 1 and imu[0]["n_samples"] == ds.timeseries("vid-b").t_ns.size
    rep = ds.report()
    assert "identical: kept videos[1]" in rep["duplicates"]["vid-b"] and "vid-b" not in rep["failed"]
    assert any("identical" in w for w in rep["recordings"]["vid-b"]["warnings"])


def test_a_list_of_two_splits_is_refused(tree, tmp_path):
    edit_meta(tree, lambda d: d["videos"][0].update(split_fho=["train", "test"]))
    with pytest.raises(SourceFormatError, match=r"videos\[0\] \(vid-a\): field 'split_fho' is \['train', 'test'\], "
                                                "several splits"):
        prepare(tree, tmp_path / "store")
    edit_meta(tree, lambda d: d["videos"][0].update(split_fho=["Train", "train"]))
    assert mmloader.open(prepare(tree, tmp_path / "store")).splits == {"train": 1, "val": 2}


# -- ids that are not safe path components ---------------------------------------------------------------
@pytest.mark.parametrize("uid, problem", [("a/../evil", "path separator"), ("../evil", "starts with '.'"), (".hidden", "starts with '.'"),
                                          ("a" * 201, "longer than 200")])
def test_unsafe_video_uid(tree, tmp_path, uid, problem):
    edit_meta(tree, lambda d: d["videos"][1].update(video_uid=uid))
    with pytest.raises(SourceFormatError, match=r"ego4d.json: videos\[1\]: field 'video_uid'.*" + problem):
        prepare(tree, tmp_path / "store")
    assert_no_store(tmp_path)
    ds = mmloader.open(prepare(tree, tmp_path / "store", errors="skip"))
    assert sorted(ds.recording_ids) == ["vid-a", "vid-c"]
    assert problem in ds.report()["failed"][uid]


# -- non-finite and absurd numbers in ego4d.json -----------------------------------------------------------
BAD_SECONDS = [float("nan"), float("inf"), float("-inf"), 1e300, -5.0, 0, True, "2.0", 10**400]


@pytest.mark.parametrize("value", BAD_SECONDS, ids=repr)
def test_bad_duration_sec_is_named_and_skippable(tree, tmp_path, value):
    edit_meta(tree, lambda d: d["videos"][1].update(duration_sec=value))
    with pytest.raises(SourceFormatError, match=r"ego4d.json: videos\[1\] \(vid-b\): field 'duration_sec' is .*"
                                                r"\(expected a number of seconds, finite, > 0 and <= 1e\+06\)"):
        prepare(tree, tmp_path / "store")
    assert_no_store(tmp_path)
    ds = mmloader.open(prepare(tree, tmp_path / "store", errors="skip"))
    assert sorted(ds.recording_ids) == ["vid-a", "vid-c"]
    assert "field 'duration_sec'" in ds.report()["failed"]["vid-b"]


@pytest.mark.parametrize("field, value, pattern", [
    ("fps", float("nan"), r"field 'video_metadata.fps' is nan"),
    ("fps", 1e300, r"field 'video_metadata.fps' is 1e\+300"),
    ("fps", 0, r"field 'video_metadata.fps' is 0"),
    ("video_start_sec", float("inf"), r"field 'video_metadata.video_start_sec' is inf"),
    ("video_start_sec", -1e300, r"field 'video_metadata.video_start_sec' is -1e\+300"),
    ("num_frames", -3, r"field 'video_metadata.num_frames' is -3"),
    ("num_frames", 2.5, r"field 'video_metadata.num_frames' is 2.5"),
    ("audio_bitrate", float("nan"), r"field 'video_metadata.audio_bitrate' is nan \(expected finite numbers"),
])
def test_bad_video_metadata_numbers(tree, tmp_path, field, value, pattern):
    edit_meta(tree, lambda d: d["videos"][2]["video_metadata"].update({field: value}))
    with pytest.raises(SourceFormatError, match=r"ego4d.json: videos\[2\] \(vid-c\): " + pattern):
        prepare(tree, tmp_path / "store")
    ds = mmloader.open(prepare(tree, tmp_path / "store", errors="skip"))
    assert sorted(ds.recording_ids) == ["vid-a", "vid-b"] and "vid-c" in ds.report()["failed"]


def test_a_negative_video_start_is_allowed(tree, tmp_path):
    edit_meta(tree, lambda d: d["videos"][0]["video_metadata"].update(video_start_sec=-0.033))
    assert len(mmloader.open(prepare(tree, tmp_path / "store")).recording_ids) == 3


def test_check_metadata_keys_entries_without_a_usable_uid_by_index(tree):
    edit_meta(tree, lambda d: d["videos"].extend([{"video_uid": None, "duration_sec": 1.0}, 7]))
    meta = check_metadata(str(meta_path(tree)), errors="skip")
    assert [v["video_uid"] for v in meta.videos] == ["vid-a", "vid-b", "vid-c"]
    assert set(meta.failed) == {"videos[3]", "videos[4]"}
    assert "field 'video_uid' is None" in meta.failed["videos[3]"] and "is a int" in meta.failed["videos[4]"]


# -- narrations ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e300, -1.0], ids=repr)
def test_bad_narration_timestamp_is_named_and_the_event_dropped_under_skip(tree, tmp_path, value):
    def bad(doc):
        doc["vid-b"]["narration_pass_1"]["narrations"].append(
            {"timestamp_sec": value, "narration_text": "#C C falls", "annotation_uid": "bad"})
    edit_narrations(tree, bad)
    with pytest.raises(SourceFormatError, match=r"narration.json: video vid-b narration_pass_1 narrations\[1\]: "
                                                r"field 'timestamp_sec' is .* \(expected a number of seconds, finite"):
        prepare(tree, tmp_path / "store")
    assert_no_store(tmp_path)
    ds = mmloader.open(prepare(tree, tmp_path / "store", errors="skip"))
    assert sorted(ds.recording_ids) == ["vid-a", "vid-b", "vid-c"]  # the recording stays, the event goes
    narr = ds.events("narrations").to_pylist()
    assert [r["uid"] for r in narr if r["recording_id"] == "vid-b"] == ["vid-b-n1"]
    rep = ds.report()
    dropped = rep["recordings"]["vid-b"]["events_dropped"]
    assert dropped["events"] == 1 and "field 'timestamp_sec'" in dropped["problems"][0]
    assert rep["totals"]["events_dropped"] == 1 and rep["failed"] == {}


def test_bad_summary_end_is_named(tree, tmp_path):
    edit_narrations(tree, lambda d: d["vid-c"]["narration_pass_1"]["summaries"][0].update(end_sec=float("inf")))
    with pytest.raises(SourceFormatError, match=r"video vid-c narration_pass_1 summaries\[0\]: field 'end_sec' is inf"):
        prepare(tree, tmp_path / "store")
    ds = mmloader.open(prepare(tree, tmp_path / "store", errors="skip"))
    assert "vid-c" not in set(ds.events("summaries")["recording_id"].to_pylist())
    assert ds.report()["recordings"]["vid-c"]["events_dropped"]["events"] == 1


def test_malformed_pass_is_dropped_under_skip(tree, tmp_path):
    edit_narrations(tree, lambda d: d["vid-a"].update(narration_pass_1=[1, 2]))
    with pytest.raises(SourceFormatError, match="video vid-a: 'narration_pass_1' is a list"):
        prepare(tree, tmp_path / "store")
    ds = mmloader.open(prepare(tree, tmp_path / "store", errors="skip"))
    assert "vid-a" in ds.recording_ids and "vid-a" not in set(ds.events("narrations")["recording_id"].to_pylist())


# -- IMU CSVs: already handled (non-finite / absurd rows are dropped and counted) ---------------------------
def test_imu_csv_with_non_finite_and_huge_numbers(tmp_path):
    rows = imu_rows(2.0)
    rows[5][2] = "inf"
    rows[6][2] = "1e300"
    rows[7][6] = "nan"
    rows[8][7] = "-inf"
    rows[9][3] = "1e300"
    rows[10][1] = "inf"; rows[10][2] = None  # unrecoverable
    imu = read_imu_csv(str(write_csv(tmp_path / "x.csv", rows)), duration_sec=2.0)
    assert np.isfinite(imu.data).all() and np.all(np.diff(imu.t_ns) > 0)
    r = imu.report
    assert r["fixed"]["timestamp_recovered"] == 2  # rows 5 and 6, through the component clock
    assert r["dropped"] == {"missing_values": 1, "value_outlier": 2, "missing_timestamp": 1}


# -- the CLI lists what was left out ---------------------------------------------------------------------------
def test_cli_lists_skipped_recordings_and_why(tree, tmp_path, capsys):
    edit_meta(tree, lambda d: (d["videos"][1].update(duration_sec=float("nan")), duplicate_b(d)))
    edit_meta(tree, lambda d: d["videos"].pop())  # back to one vid-b (the NaN one)...
    edit_meta(tree, lambda d: d["videos"].append(dict(d["videos"][2], split_fho="test")))  # ...and vid-c twice
    edit_narrations(tree, lambda d: d["vid-a"]["narration_pass_1"]["narrations"][0].update(timestamp_sec=1e300))
    rc = cli.main(["prepare", "ego4d", str(tree), str(tmp_path / "store"), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "ego4d.json: videos[1] (vid-b): field 'duration_sec' is nan" in err
    assert not (tmp_path / "store").exists()
    rc = cli.main(["prepare", "ego4d", str(tree), str(tmp_path / "store"), "-q", "--errors", "skip"])
    out = capsys.readouterr().out
    assert rc == 0 and "prepared 1 recordings" in out
    assert "left out (bad source; --errors skip): 2" in out
    assert "  vid-b: " in out and "field 'duration_sec' is nan" in out
    assert "  vid-c: " in out and "listed 2 times" in out
    assert "repeated recording ids: 1" in out
    assert "bad events dropped (--errors skip): 1" in out and "field 'timestamp_sec' is 1e+300" in out


# -- write_store on any iterable -------------------------------------------------------------------------------
CH = ["acc_x", "acc_y", "acc_z"]


def rec(i: int, seconds: float = 2.0, **kw) -> Recording:
    t = np.arange(int(seconds * 50), dtype=np.int64) * (NS // 50)
    x = np.random.default_rng(i).normal(size=(t.size, 3)).astype(np.float32)
    return Recording(id=f"r{i}", split="train" if i % 2 else "val",
                     timeseries={"wrist": TimeSeriesInput(t, x, CH, ["m/s^2"] * 3)},
                     events={"labels": [(0, NS, f"label {i}")]}, **kw)


def test_write_store_from_a_generator_writes_every_recording(tmp_path):
    url = write_store(tmp_path / "s", (rec(i) for i in range(5)), dataset="gen")
    ds = mmloader.open(url)
    assert sorted(ds.recording_ids) == [f"r{i}" for i in range(5)]
    assert len(ds.events("labels")) == 5 and ds.splits == {"train": 2, "val": 3}
    # the same recordings from a list give the same store (and the same source fingerprint)
    url2 = write_store(tmp_path / "s2", [rec(i) for i in reversed(range(5))], dataset="gen")
    assert mmloader.open(url2).store.manifest["source_fingerprint"] == ds.store.manifest["source_fingerprint"]


def test_write_store_holds_one_recording_at_a_time(tmp_path):
    alive: list[weakref.ref] = []
    peak = []

    def gen():
        for i in range(4):
            gc.collect()
            peak.append(sum(r() is not None for r in alive))
            r = rec(i, seconds=20.0)
            alive.append(weakref.ref(r.timeseries["wrist"].data))
            yield r
            del r

    write_store(tmp_path / "s", gen())
    assert peak == [0, 0, 0, 0]  # each recording's arrays were let go before the next was read


@pytest.mark.parametrize("empty", [[], (), iter([]), (r for r in [])], ids=["list", "tuple", "iter", "generator"])
def test_write_store_refuses_an_empty_store_and_leaves_nothing(tmp_path, empty):
    with pytest.raises(InputError, match="at least one Recording"):
        write_store(tmp_path / "deep" / "s", empty)
    assert os.listdir(tmp_path) == []


def test_a_bad_recording_or_a_failing_generator_mid_stream_leaves_nothing(tmp_path):
    def gen(bad):
        yield rec(0)
        yield rec(1)
        if bad == "raise":
            raise RuntimeError("reader failed")
        yield Recording(id="r0", timeseries=rec(2).timeseries)

    with pytest.raises(InputError, match="'r0' appears twice"):
        write_store(tmp_path / "s", gen("dup"))
    with pytest.raises(RuntimeError, match="reader failed"):
        write_store(tmp_path / "s", gen("raise"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("make, match", [
    (lambda: rec(0, duration_ns=float("nan")), "duration_ns is nan"),
    (lambda: rec(0, duration_ns=-5), "duration_ns is -5"),
    (lambda: rec(0, duration_ns=10**30), "duration_ns is 1000000000000000000000000000000"),
    (lambda: Recording(id="r", timeseries=rec(0).timeseries, events={"l": [(0, 10**30, "x")]}), "outside the int64"),
    (lambda: rec(0, meta={"x": float("nan")}), "meta is not JSON-serialisable"),
    (lambda: Recording(id=".r", timeseries=rec(0).timeseries), r"recording id '\.r'.*starts with '\.'"),
    (lambda: Recording(id="r\n", timeseries=rec(0).timeseries), "control character"),
    (lambda: Recording(id="r", timeseries={"wrist": TimeSeriesInput(np.array([1, 2**63 + 5], dtype=np.uint64),
                                                                    np.zeros((2, 3)), CH, ["m/s^2"] * 3)}),
     "above the int64 range"),
])
def test_byo_numbers_and_ids(tmp_path, make, match):
    with pytest.raises(InputError, match=match):
        write_store(tmp_path / "s", [rec(1), make()])
    assert os.listdir(tmp_path) == []


def test_write_store_refuses_a_non_iterable(tmp_path):
    with pytest.raises(InputError, match="iterable of Recording"):
        write_store(tmp_path / "s", rec(0))
    with pytest.raises(InputError, match="gap_factor"):
        write_store(tmp_path / "s", [rec(0)], gap_factor=float("nan"))


# -- Aria: folder names are ids; speech.csv numbers ------------------------------------------------------------
AEA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "aria", "aea_test_recording")


def test_speech_csv_absurd_numbers(tmp_path):
    from mmloader.recipes.aria.recipe import read_speech_csv

    head = "startTime_ns,endTime_ns,written,confidence\n"
    for line, pattern in [("1,2,a,inf", "field 'confidence' is 'inf'"), ("1,2,a,nan", "field 'confidence' is 'nan'"),
                          ("1,2,a,1.5", "field 'confidence' is '1.5'"),
                          (f"1,{10**30},a,0.5", "field 'endTime_ns' is 1000000000000000000000000000000"),
                          ("-4,2,a,0.5", "field 'startTime_ns' is -4"), ("1e300,2,a,0.5", "line 2")]:
        p = tmp_path / "speech.csv"
        p.write_text(head + line + "\n")
        with pytest.raises(SourceFormatError, match=f"speech.csv: line 2.*{pattern}" if "line" not in pattern
                           else "speech.csv: line 2"):
            read_speech_csv(str(p))
    (tmp_path / "speech.csv").write_text(head + "1,2,a,\n")
    assert np.isnan(read_speech_csv(str(tmp_path / "speech.csv"))[0].confidence)  # empty: no confidence


@pytest.mark.skipif(not os.path.exists(os.path.join(AEA, "recording.vrs")), reason="no Aria test recording")
def test_aria_folder_name_that_is_not_a_safe_id(tmp_path):
    pytest.importorskip("projectaria_tools")
    from mmloader.recipes.aria.recipe import AriaAdapter

    root = tmp_path / "aria"
    for name in ("good", "bad\x01name"):
        (root / name).mkdir(parents=True)
        os.symlink(os.path.abspath(os.path.join(AEA, "recording.vrs")), root / name / "recording.vrs")
    with pytest.raises(SourceFormatError, match=r"recording id \(the folder name\): id 'bad\\x01name' contains a NUL or "
                                                "control character"):
        AriaAdapter().prepare(str(root), str(tmp_path / "store"), progress=False, rgb=False)
    assert not (tmp_path / "store").exists()
    url = AriaAdapter().prepare(str(root), str(tmp_path / "store"), progress=False, rgb=False, errors="skip")
    ds = mmloader.open(url)
    assert ds.recording_ids == ["good"]
    assert "control character" in ds.report()["failed"]["bad\x01name"]
