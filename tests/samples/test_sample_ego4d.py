"""The synthetic Ego4D sample generator: layout, formats, determinism, defects, learnable content."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import av
import numpy as np
import pytest

from mmloader.samples.ego4d import (
    ACTIVITIES,
    DEFECT_KINDS,
    IMU_HEADER,
    generate_ego4d_sample,
    load_sample_manifest,
    sample_defects,
)

SMALL = dict(videos=4, seconds=12.0, seed=0, fps=10.0, size=(64, 48), progress=False)
TEXT_SUFFIXES = (".csv", ".json")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return generate_ego4d_sample(tmp_path_factory.mktemp("ego4d") / "root", **SMALL)


@pytest.fixture(scope="module")
def long_clean(tmp_path_factory) -> Path:
    """Longer videos, no defects: enough segments for per-activity statistics."""
    return generate_ego4d_sample(tmp_path_factory.mktemp("ego4d_long") / "root", videos=4, seconds=60.0, seed=0,
                                 defect_fraction=0.0, fps=5.0, size=(32, 32), progress=False)


def _json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _videos(root: Path) -> list[dict]:
    return _json(root / "v2" / "ego4d.json")["videos"]


def _segments(root: Path) -> dict[str, list[dict]]:
    return _json(root / "v2" / "annotations" / "sample_activity_segments.json")


def _csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _float(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def _imu_columns(path: Path) -> dict[str, np.ndarray]:
    header, rows = _csv_rows(path)
    return {name: np.array([float(r[i]) for r in rows]) for i, name in enumerate(header)}


# ---------------------------------------------------------------------------------------------- layout


def test_tree_has_exactly_the_documented_files(small):
    videos = _videos(small)
    expected = {"sample_manifest.json", "v2/ego4d.json", "v2/annotations/narration.json",
                "v2/annotations/sample_activity_segments.json"}
    expected |= {f"v2/full_scale/{v['video_uid']}.mp4" for v in videos}
    expected |= {f"v2/imu/{v['video_uid']}.csv" for v in videos if v["has_imu"]}
    found = {p.relative_to(small).as_posix() for p in small.rglob("*") if p.is_file()}
    assert found == expected


def test_ego4d_json_fields(small):
    doc = _json(small / "v2" / "ego4d.json")
    assert doc["version"] == "v2" and doc["date"] == "2022-01-01" and doc["clips"] == []
    assert "synthetic" in doc["description"]
    videos = doc["videos"]
    assert len(videos) == SMALL["videos"]
    for v in videos:
        assert len(v["video_uid"]) == 36 and v["video_uid"][14] == "4"  # uuid4-formatted
        assert isinstance(v["duration_sec"], float) and v["duration_sec"] == pytest.approx(SMALL["seconds"])
        assert v["scenarios"] and all(isinstance(s, str) for s in v["scenarios"])
        assert isinstance(v["device"], str) and isinstance(v["physical_setting_name"], str)
        assert v["has_gaze"] is False and v["split_em"] is None and v["split_av"] is None
        assert v["split_fho"] in ("train", "val", "test")
        vm = v["video_metadata"]
        assert vm["fps"] == SMALL["fps"] and vm["num_frames"] == 120 and vm["video_codec"] == "h264"
        assert (vm["display_resolution_width"], vm["display_resolution_height"]) == SMALL["size"]
        assert (vm["sample_resolution_width"], vm["sample_resolution_height"]) == SMALL["size"]
        assert vm["mp4_duration_sec"] == pytest.approx(12.0) and vm["video_duration_sec"] == pytest.approx(12.0)
        assert vm["video_start_sec"] == 0.0 and vm["audio_codec"] is None
    splits = [v["split_fho"] for v in videos]
    assert "train" in splits and "val" in splits
    no_imu = [i for i, v in enumerate(videos) if not v["has_imu"]]
    assert len(no_imu) == 1 and no_imu[0] != 0
    assert not (small / "v2" / "imu" / f"{videos[no_imu[0]]['video_uid']}.csv").exists()


def test_csv_header_is_exact(small):
    for v in _videos(small):
        if v["has_imu"]:
            first = (small / "v2" / "imu" / f"{v['video_uid']}.csv").read_text().split("\n", 1)[0]
            assert first == IMU_HEADER
            assert first == ("component_idx,component_timestamp_ms,canonical_timestamp_ms,"
                             "gyro_x,gyro_y,gyro_z,accl_x,accl_y,accl_z")


def test_activity_segments_cover_each_video(small):
    segs = _segments(small)
    assert set(segs) == {v["video_uid"] for v in _videos(small)}
    for uid, ss in segs.items():
        assert ss[0]["start_sec"] == 0.0 and ss[-1]["end_sec"] == pytest.approx(12.0)
        for a, b in zip(ss, ss[1:]):
            assert a["end_sec"] == b["start_sec"] and a["activity"] != b["activity"]
        assert all(s["activity"] in ACTIVITIES for s in ss)


def test_manifest_lists_every_video(small):
    man = load_sample_manifest(small)
    videos = _videos(small)
    assert [m["video_uid"] for m in man["videos"]] == [v["video_uid"] for v in videos]
    narrated = set(_json(small / "v2" / "annotations" / "narration.json"))
    for m, v in zip(man["videos"], videos):
        assert m["split"] == v["split_fho"] and m["has_imu"] == v["has_imu"]
        assert m["has_narrations"] == (m["video_uid"] in narrated)
        assert m["activities"] == _segments(small)[m["video_uid"]]
        assert set(m["defects"]) <= set(DEFECT_KINDS)
    assert sample_defects(small) == {m["video_uid"]: m["defects"] for m in man["videos"]}


# ---------------------------------------------------------------------------------------------- narrations


def test_narration_json_structure(small):
    doc = _json(small / "v2" / "annotations" / "narration.json")
    videos = _videos(small)
    missing = [v for v in videos if v["video_uid"] not in doc]
    assert len(missing) == 1 and missing[0]["has_imu"]
    passes = [tuple(k for k in doc[v["video_uid"]] if k.startswith("narration_pass")) for v in videos
              if v["video_uid"] in doc]
    assert ("narration_pass_1",) in passes and ("narration_pass_2",) in passes
    fps = SMALL["fps"]
    for uid, entry in doc.items():
        assert entry["status"] == "complete"
        for name in ("narration_pass_1", "narration_pass_2"):
            if name not in entry:
                continue
            block = entry[name]
            assert block["narrations"] and block["summaries"]
            for n in block["narrations"]:
                assert set(n) == {"timestamp_sec", "timestamp_frame", "narration_text", "annotation_uid"}
                assert n["timestamp_frame"] == round(n["timestamp_sec"] * fps)
            for s in block["summaries"]:
                assert set(s) == {"start_sec", "end_sec", "start_frame", "end_frame", "summary_text", "annotation_uid"}
                assert s["summary_text"].startswith("#summary C ") and s["start_sec"] < s["end_sec"]


def test_narrations_lie_inside_their_segments_and_use_tags(long_clean):
    doc = _json(long_clean / "v2" / "annotations" / "narration.json")
    segs = _segments(long_clean)
    texts = []
    for uid, entry in doc.items():
        for name in ("narration_pass_1", "narration_pass_2"):
            for n in entry.get(name, {}).get("narrations", []):
                t = n["timestamp_sec"]
                inside = [s for s in segs[uid] if s["start_sec"] < t < s["end_sec"]]
                assert len(inside) == 1, f"{uid} {t} is on a segment boundary"
                texts.append(n["narration_text"])
            ts = [n["timestamp_sec"] for n in entry.get(name, {}).get("narrations", [])]
            assert ts == sorted(ts)
    assert all(t.startswith("#C C ") or t.startswith("#O ") for t in texts)
    assert any(t.startswith("#O ") for t in texts)
    assert any(t.endswith(" #unsure") for t in texts)
    assert len({t for t in texts if t.startswith("#C")}) >= 10  # several phrasings


# ---------------------------------------------------------------------------------------------- video


def test_mp4_is_h264_with_the_declared_frames(small):
    for v in _videos(small):
        with av.open(str(small / "v2" / "full_scale" / f"{v['video_uid']}.mp4")) as c:
            s = c.streams.video[0]
            assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
            assert float(s.average_rate) == SMALL["fps"]
            assert (s.width, s.height) == SMALL["size"]
            pts = sorted(p.pts for p in c.demux(s) if p.pts is not None)
        assert len(pts) == v["video_metadata"]["num_frames"]
        step = pts[1] - pts[0]
        assert all(b - a == step for a, b in zip(pts, pts[1:]))  # constant frame rate
        assert float(pts[0] * s.time_base) == 0.0


def test_frames_differ_more_across_activities_than_within(small):
    """Mean colour of the top/bottom halves + per-channel std, per frame."""
    fps = SMALL["fps"]
    across, within = [], []
    for uid, ss in _segments(small).items():
        frames = _decode(small / "v2" / "full_scale" / f"{uid}.mp4").astype(np.float64)
        half = frames.shape[1] // 2
        feats = np.concatenate([frames[:, :half].mean(axis=(1, 2)), frames[:, half:].mean(axis=(1, 2)),
                                frames.std(axis=(1, 2))], axis=1)
        t = np.arange(len(frames)) / fps
        means = []
        for s in ss:
            f = feats[(t >= s["start_sec"]) & (t < s["end_sec"])]
            means.append(f.mean(axis=0))
            within.append(np.linalg.norm(f - f.mean(axis=0), axis=1).mean())
        across += [np.linalg.norm(a - b) for a, b in zip(means, means[1:])]
    assert across, "no video changes activity"
    assert np.mean(across) > 2.0 * np.mean(within)
    assert min(across) > np.mean(within)


# ---------------------------------------------------------------------------------------------- determinism


def _text_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.suffix in TEXT_SUFFIXES}


def test_same_seed_same_bytes_and_frames(small, tmp_path):
    again = generate_ego4d_sample(tmp_path / "again", **SMALL)
    assert _text_files(again) == _text_files(small)
    for p in sorted((small / "v2" / "full_scale").glob("*.mp4")):
        np.testing.assert_array_equal(_decode(p), _decode(again / "v2" / "full_scale" / p.name))


def test_other_seed_differs(small, tmp_path):
    other = generate_ego4d_sample(tmp_path / "other", **{**SMALL, "seed": 1})
    assert {v["video_uid"] for v in _videos(other)}.isdisjoint(v["video_uid"] for v in _videos(small))
    a = sorted((small / "v2" / "imu").glob("*.csv"))[0].read_bytes()
    b = sorted((other / "v2" / "imu").glob("*.csv"))[0].read_bytes()
    assert a != b


# ---------------------------------------------------------------------------------------------- defects


def test_defects_are_present_in_defective_csvs(small):
    man = load_sample_manifest(small)
    defective = [m for m in man["videos"] if m["defects"]]
    assert len(defective) == 1  # round(0.3 * 3 IMU videos)
    duration = SMALL["seconds"]
    for m in defective:
        assert m["defects"] == list(DEFECT_KINDS) and m["has_imu"]
        header, rows = _csv_rows(small / "v2" / "imu" / f"{m['video_uid']}.csv")
        assert header == IMU_HEADER.split(",")
        canon = [r[2] for r in rows]
        assert "" in canon and "NULL" in canon
        assert any(r[6:9] == ["", "", ""] for r in rows)
        assert any(sum(x == "" for x in r[6:9]) == 1 for r in rows)
        values = [_float(x) for x in canon]
        assert any(v is not None and abs(v) >= 1e11 for v in values)  # absurd times
        plausible = [v for v in values if v is not None and 0 <= v <= duration * 1000]
        assert any(b < a for a, b in zip(plausible, plausible[1:]))  # non-monotonic
        lines = [",".join(r) for r in rows]
        assert len(set(lines)) < len(lines)  # exact duplicate rows
        by_time: dict[str, set[str]] = {}
        for r in rows:
            if _float(r[2]) is not None:
                by_time.setdefault(r[2], set()).add(",".join(r[3:]))
        assert any(len(v) > 1 for v in by_time.values())  # same timestamp, other values
        comps = {r[0] for r in rows}
        assert comps == {str(c) for c in range(len(m["gaps_sec"]) + 1)} and len(comps) >= 2
        # the gap: no sample inside, exactly the recorded bounds around it, 1-3 s long
        t = np.array(sorted(set(plausible))) / 1000.0
        for a, b in m["gaps_sec"]:
            assert 1.0 <= b - a <= 3.1
            assert not np.any((t > a + 1e-9) & (t < b - 1e-9))
            assert np.any(np.isclose(t, a)) and np.any(np.isclose(t, b))
        # a fresh device-clock offset per component
        offsets = {}
        for r in rows:
            if _float(r[2]) is not None and 0 <= float(r[2]) <= duration * 1000:
                offsets.setdefault(r[0], round(float(r[1]) - float(r[2])))
        assert len(set(offsets.values())) == len(comps)


def _check_clean_csv(path: Path, duration: float) -> None:
    header, rows = _csv_rows(path)
    assert all(all(x != "" for x in r) and len(r) == 9 for r in rows)
    assert {r[0] for r in rows} == {"0"}
    t = np.array([float(r[2]) for r in rows]) / 1000.0
    dt = np.diff(t)
    assert np.all(dt > 0)
    assert 0.0 <= t[0] <= 0.55 and duration - 0.55 <= t[-1] <= duration
    assert 195.0 < 1.0 / np.median(dt) < 205.0
    assert dt.std() > 5e-5  # irregular sample times
    comp = np.array([float(r[1]) for r in rows])
    assert comp[0] > 1e12 and np.allclose(comp - t * 1000.0, comp[0] - t[0] * 1000.0, atol=2e-3)
    for r in rows[:50]:
        assert all(len(x.split(".")[1]) == 6 for x in r[3:])


def test_clean_csvs_are_clean(small):
    man = load_sample_manifest(small)
    clean = [m for m in man["videos"] if m["has_imu"] and not m["defects"]]
    assert len(clean) == 2
    for m in clean:
        _check_clean_csv(small / "v2" / "imu" / f"{m['video_uid']}.csv", SMALL["seconds"])
        assert m["gaps_sec"] == [] and [c["component_idx"] for c in m["components"]] == [0]


def test_defect_fraction_zero_means_all_clean(long_clean):
    man = load_sample_manifest(long_clean)
    assert all(m["defects"] == [] for m in man["videos"])
    for m in man["videos"]:
        if m["has_imu"]:
            _check_clean_csv(long_clean / "v2" / "imu" / f"{m['video_uid']}.csv", 60.0)


def test_defect_fraction_one_damages_every_csv(tmp_path):
    root = generate_ego4d_sample(tmp_path / "all", **{**SMALL, "defect_fraction": 1.0})
    man = load_sample_manifest(root)
    assert all(bool(m["defects"]) == m["has_imu"] for m in man["videos"])


# ---------------------------------------------------------------------------------------------- learnability


def test_imu_statistics_differ_per_activity(long_clean):
    """Per-activity IMU statistics (away from the blended segment edges) separate the activities."""
    segs = _segments(long_clean)
    acc_std: dict[str, list[float]] = {}
    gyro_mag: dict[str, list[float]] = {}
    for v in _videos(long_clean):
        if not v["has_imu"]:
            continue
        cols = _imu_columns(long_clean / "v2" / "imu" / f"{v['video_uid']}.csv")
        t = cols["canonical_timestamp_ms"] / 1000.0
        acc = np.linalg.norm(np.stack([cols[f"accl_{a}"] for a in "xyz"], axis=1), axis=1)
        gyro = np.linalg.norm(np.stack([cols[f"gyro_{a}"] for a in "xyz"], axis=1), axis=1)
        assert 9.0 < np.median(acc) < 10.6  # gravity is in the accelerometer
        for s in segs[v["video_uid"]]:
            m = (t > s["start_sec"] + 1.0) & (t < s["end_sec"] - 1.0)
            acc_std.setdefault(s["activity"], []).append(float(acc[m].std()))
            gyro_mag.setdefault(s["activity"], []).append(float(gyro[m].mean()))
    needed = {"walking", "running", "sitting down", "looking around"}
    assert needed <= set(acc_std), f"seed 0 no longer covers {needed - set(acc_std)}"
    a = {k: np.mean(v) for k, v in acc_std.items()}
    g = {k: np.mean(v) for k, v in gyro_mag.items()}
    assert a["running"] > 2.0 * a["walking"] > 2.0 * 2.0 * a["sitting down"]
    assert a["looking around"] < 0.5 * a["walking"]  # head turns, body still: accel is mostly gravity
    assert g["looking around"] > 3.0 * g["sitting down"]
    assert max(g["looking around"], g["running"]) > 0.4


def test_every_activity_appears(long_clean):
    assert {s["activity"] for ss in _segments(long_clean).values() for s in ss} == set(ACTIVITIES)


# ---------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("bad", [
    {"videos": 1}, {"videos": 2.5}, {"videos": True}, {"seconds": 9.9}, {"seconds": float("nan")},
    {"seed": -1}, {"seed": 1.5}, {"defect_fraction": -0.1}, {"defect_fraction": 1.5}, {"fps": 0.0},
    {"size": (63, 48)}, {"size": (16, 16)}, {"size": (64,)}, {"size": "64x48"},
])
def test_bad_arguments_raise_value_error(tmp_path, bad):
    with pytest.raises(ValueError):
        generate_ego4d_sample(tmp_path / "bad", **{**SMALL, **bad})
    assert not (tmp_path / "bad").exists()


def test_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        generate_ego4d_sample(tmp_path / "x", **SMALL)
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["keep.txt"]
