"""The Project Aria recipe on genuine VRS files (read-only; stores and layouts go to tmp_path).

projectaria-tools is a CI dependency of these tests: they are never skipped.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from projectaria_tools.core import data_provider

import mmloader
from mmloader.recipes import available, get_adapter
from mmloader.recipes.aria.recipe import (
    CHANNELS,
    AriaAdapter,
    AriaLayout,
    group_sentences,
    mp4_time_base,
    read_speech_csv,
)
from mmloader.cli import main as cli_main
from mmloader.errors import SourceFormatError
from mmloader.video.probe import media_url, probe_video

# the shared data sits beside the repository (here and in CI); MMLOADER_SHARED overrides
DATA = Path(os.environ.get("MMLOADER_SHARED", Path(__file__).resolve().parents[3] / "shared")) / "data" / "aria"
assert DATA.is_dir(), f"{DATA}: the genuine Aria test recordings are missing (expected ../shared/data/aria)"
AEA = DATA / "aea_test_recording"
ADT = DATA / "adt_test"
NS = 1_000_000_000


def link_recording(src: Path, dst: Path) -> Path:
    """A recording folder at ``dst`` whose files are symlinks to the read-only originals."""
    dst.mkdir(parents=True)
    for name in os.listdir(src):
        os.symlink(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def aea_store(tmp_path_factory) -> str:
    dst = tmp_path_factory.mktemp("aria") / "aea"
    return AriaAdapter().prepare(str(AEA), str(dst), progress=False)


@pytest.fixture(scope="module")
def capture_times() -> np.ndarray:
    """RGB capture times (DEVICE_TIME ns) read independently from the VRS file."""
    p = data_provider.create_vrs_data_provider(str(AEA / "recording.vrs"))
    sid = p.get_stream_id_from_label("camera-rgb")
    return np.array([p.get_image_data_by_index(sid, i)[1].capture_timestamp_ns for i in range(p.get_num_data(sid))])


def test_registered_builtin():
    assert "aria" in available()
    assert get_adapter("aria").name == "aria"


def test_both_imus_by_label(aea_store):
    ds = mmloader.open(aea_store)
    rows = {r["stream"]: r for r in ds.streams.to_pylist()}
    assert {"imu", "imu_right", "imu_left", "video", "narrations"} <= set(rows)
    right, left = ds.timeseries("aea_test_recording", "imu_right"), ds.timeseries("aea_test_recording", "imu_left")
    assert right.t_ns.shape == (400,) and left.t_ns.shape == (319,)
    assert right.t_ns[0] == 86347942362 and right.t_ns.dtype == np.int64
    assert np.all(np.diff(right.t_ns) > 0) and np.all(np.diff(left.t_ns) > 0)
    assert list(right.channels) == CHANNELS and right.units[0] == "m/s^2" and right.units[3] == "rad/s"
    assert right.data.shape == (400, 6) and right.data.dtype == np.float32
    assert 8.0 < np.linalg.norm(right.data[:, :3], axis=1).mean() < 11.5  # gravity, m/s^2
    assert rows["imu_right"]["rate_hz"] == pytest.approx(1000, rel=0.01)
    assert rows["imu_left"]["rate_hz"] == pytest.approx(800, rel=0.01)
    # 'imu' is the right IMU (the default imu="right"): the same Zarr group
    assert rows["imu"]["uri"] == rows["imu_right"]["uri"]
    rep = ds.report()["recordings"]["aea_test_recording"]
    assert {"imu-right", "imu-left", "camera-rgb"} <= set(rep["labels_found"]) and rep["absent"] == []
    assert rep["imu_right"]["samples"] == 400 and rep["imu_left"]["samples"] == 319
    assert rep["imu_right"]["measured_rate_hz"] == pytest.approx(1000, rel=0.01)
    assert rep["imu_left"]["measured_rate_hz"] == pytest.approx(800, rel=0.01)
    assert rep["imu_right"]["fixed"] == {"reordered": 0, "duplicate_timestamp": 0}
    assert rep["imu"] == {"alias_of": "imu_right", "label": "imu-right"}


def test_rgb_transcoded_upright_with_capture_times(aea_store, capture_times):
    ds = mmloader.open(aea_store)
    row = [r for r in ds.streams.to_pylist() if r["stream"] == "video"][0]
    assert row["uri"] == "media/aea_test_recording/camera-rgb.mp4"  # relative to the store root
    mp4 = media_url(aea_store, row["uri"])
    assert mp4 == os.path.join(aea_store, "media", "aea_test_recording", "camera-rgb.mp4")
    assert os.path.isfile(mp4) and (row["width"], row["height"]) == (704, 704) and row["codec"] == "h264"
    rep = ds.report()["recordings"]["aea_test_recording"]["video"]
    assert rep["native_size"] == [1408, 1408] and rep["size"] == [704, 704] and rep["rotate"] == -90
    assert rep["frames"] == 8 == len(capture_times)
    pts, key = ds.store.video_index("aea_test_recording", "video")
    tb = mp4_time_base(int(capture_times[-1]))
    assert np.all(np.abs(pts - capture_times) <= NS * tb)  # capture times, rounded to the mp4 time base only
    assert key[0] and key.sum() == 1  # 8 frames at 20 fps, a keyframe every 0.5 s
    info = probe_video(mp4)
    assert np.array_equal(info.pts_ns, pts)
    # upright: the decoded first frame matches the VRS image turned 90 degrees clockwise, not the raw one
    p = data_provider.create_vrs_data_provider(str(AEA / "recording.vrs"))
    raw = p.get_image_data_by_index(p.get_stream_id_from_label("camera-rgb"), 0)[0].to_numpy_array()
    small = raw.reshape(44, 32, 44, 32, 3).mean(axis=(1, 3))
    with av.open(mp4) as c:
        got = next(c.decode(video=0)).to_ndarray(format="rgb24").reshape(44, 16, 44, 16, 3).mean(axis=(1, 3))
    err_rot = np.abs(got - np.rot90(small, -1)).mean()
    err_raw = np.abs(got - small).mean()
    assert err_rot < 6 and err_raw > 3 * err_rot


def test_rgb_size_and_rotation_options(tmp_path):
    url = AriaAdapter().prepare(str(ADT), str(tmp_path / "s"), progress=False, rgb_size=(256, 192), rotate=90)
    ds = mmloader.open(url)
    row = [r for r in ds.streams.to_pylist() if r["stream"] == "video"][0]
    assert (row["height"], row["width"]) == (256, 192) and row["n_samples"] == 3
    rep = ds.report()["recordings"]["adt_test"]["video"]
    assert rep["native_size"] == [1408, 1408] and rep["rotate"] == 90
    with av.open(media_url(url, row["uri"])) as c:
        frame = next(c.decode(video=0))
    assert (frame.height, frame.width) == (256, 192)
    native = AriaAdapter().prepare(str(ADT), str(tmp_path / "n"), progress=False, rgb_size=None, imu="left")
    ds = mmloader.open(native)
    row = [r for r in ds.streams.to_pylist() if r["stream"] == "video"][0]
    assert (row["height"], row["width"]) == (1408, 1408)
    rows = {r["stream"]: r for r in ds.streams.to_pylist()}
    assert rows["imu"]["uri"] == rows["imu_left"]["uri"] and rows["imu"]["n_samples"] == 79
    with pytest.raises(ValueError, match="rgb_size"):
        AriaAdapter().prepare(str(ADT), str(tmp_path / "x"), rgb_size=(255, 192))
    with pytest.raises(ValueError, match="imu"):
        AriaAdapter().prepare(str(ADT), str(tmp_path / "x"), imu="middle")


def test_open_by_name_and_windows(tmp_path):
    ds = mmloader.open("aria", root=str(AEA), cache=str(tmp_path / "cache"), progress=False)
    assert ds.name == "aria" and ds.recording_ids == ["aea_test_recording"]
    wins = ds.windows(sec=0.2, stride=0.05, modalities=["imu", "video"], frames=2)
    assert len(wins) >= 2 and wins.report()["kept"] == len(wins)
    for i in range(len(wins)):
        s = wins[i]
        assert s["imu"].shape == (6, 40) and s["imu_mask"].shape == (40,)  # 0.2 s at 200 Hz
        assert s["imu_mask"].sum() >= 20  # the edges of a 0.4 s file are masked (anti-aliasing filter support)
        assert s["video"].shape == (2, 3, 704, 704)
        t = s["t0"] + s["video_t"].numpy().astype(np.float64)
        assert np.all((t >= s["t0"] - 1e-6) & (t < s["t1"]))
        assert 86.3 < s["t0"] < 86.8  # DEVICE_TIME, not shifted to 0
    batch = next(iter(wins.loader(batch_size=2)))
    assert batch["imu"].shape == (2, 6, 40) and batch["video"].shape == (2, 2, 3, 704, 704)
    # the same source opened again reuses the prepared store
    assert mmloader.open("aria", root=str(AEA), cache=str(tmp_path / "cache"), progress=False).url == ds.url


def test_speech_grouped_into_sentences(aea_store):
    ds = mmloader.open(aea_store)
    ev = ds.events("narrations").to_pylist()
    assert [e["text"] for e in ev] == ["and", "what is there like looking at?", "I'm in the masters, right now."]
    assert all(e["kind"] == "narration" and e["source"] == "speech.csv" for e in ev)
    assert (ev[1]["t_start_ns"], ev[1]["t_end_ns"]) == (128657000000, 131017000000)
    assert ev[2]["text_raw"] == "I'm in the masters, right now." and ev[2]["n_words"] == 6
    rep = ds.report()["recordings"]["aea_test_recording"]["speech"]
    assert rep["words"] == 13 and rep["sentences"] == 3 and rep["dropped_low_confidence"] == 0
    assert rep["sentences_inside_sensor_span"] == 0  # the AEA slice's speech lies outside its VRS data
    # windows simply find no narration there
    wins = ds.windows(sec=0.2, modalities=["imu", "text"])
    assert len(wins) == 0 and wins.report()["dropped"] == {"no_text": wins.report()["candidates"]}


def test_min_confidence_drops_words(tmp_path):
    url = AriaAdapter().prepare(str(AEA), str(tmp_path / "s"), progress=False, min_confidence=0.3, rgb=False)
    ds = mmloader.open(url)
    rep = ds.report()["recordings"]["aea_test_recording"]
    assert rep["speech"]["dropped_low_confidence"] == 3  # "and" 0.02, "like" 0.29, "at?" 0.28
    assert [e["text"] for e in ds.events("narrations").to_pylist()] == [
        "what is there looking", "I'm in the masters, right now."]
    assert rep["video"] == {"skipped": "rgb=False"} and "video" not in ds.modalities


def test_sentence_rules():
    words = read_speech_csv(str(AEA / "speech.csv"))
    assert len(words) == 13 and words[10].written == "masters,"
    assert [len(s) for s in group_sentences(words, pause_sec=0.6)] == [1, 6, 6]
    assert [len(s) for s in group_sentences(words, pause_sec=100.0)] == [7, 6]  # punctuation only


def test_adt_single_vrs_folder_without_speech(tmp_path):
    layout = AriaLayout(str(ADT))
    assert [r.recording_id for r in layout.recordings] == ["adt_test"]
    assert layout.recordings[0].vrs.endswith("video.vrs") and layout.recordings[0].speech is None
    url = AriaAdapter().prepare(str(ADT), str(tmp_path / "s"), progress=False)
    ds = mmloader.open(url)
    rows = {r["stream"]: r for r in ds.streams.to_pylist()}
    assert rows["imu_right"]["n_samples"] == 99 and rows["imu_left"]["n_samples"] == 79
    assert rows["video"]["n_samples"] == 3 and "narrations" not in rows
    rep = ds.report()["recordings"]["adt_test"]
    assert "no speech.csv" in rep["speech"]["note"]
    assert json.loads(ds.recordings["meta_json"][0].as_py())["metadata_json"]["dataset_name"] == "ADT_2023"


def test_root_with_several_recordings_and_cli(tmp_path):
    root = tmp_path / "aria"
    link_recording(AEA, root / "rec-a")
    link_recording(ADT, root / "rec-b")
    (root / "notes").mkdir()
    assert cli_main(["prepare", "aria", str(root), str(tmp_path / "s"), "-q"]) == 0
    ds = mmloader.open(str(tmp_path / "s"))
    assert sorted(ds.recording_ids) == ["rec-a", "rec-b"]
    assert ds.report()["skipped"] == {"notes": "no .vrs file"}
    assert len(ds.windows(sec=0.05, modalities=["imu"])) > 0


def test_garbage_vrs_is_a_clear_error_and_leaves_no_store(tmp_path):
    rec = tmp_path / "src" / "broken"
    rec.mkdir(parents=True)
    (rec / "recording.vrs").write_bytes(b"this is not a VRS file" * 1000)
    dst = tmp_path / "out" / "store"
    with pytest.raises(SourceFormatError, match="recording.vrs") as e:
        AriaAdapter().prepare(str(rec), str(dst), progress=False)
    assert "VRS" in str(e.value)
    assert not dst.exists() and os.listdir(dst.parent) == []
    # errors="skip": a good recording next to the bad one is prepared, the bad one reported
    link_recording(AEA, tmp_path / "src" / "good")
    url = AriaAdapter().prepare(str(tmp_path / "src"), str(dst), progress=False, errors="skip", rgb=False)
    rep = mmloader.open(url).report()
    assert list(rep["recordings"]) == ["good"] and "recording.vrs" in rep["failed"]["broken"]


class _Hiding:
    """A VrsDataProvider that hides some labels (as a file recorded without those sensors would)."""

    def __init__(self, provider, hidden: set[str]):
        self._p, self._hidden = provider, hidden

    def get_stream_id_from_label(self, label):
        return None if label in self._hidden else self._p.get_stream_id_from_label(label)

    def get_all_streams(self):
        return [s for s in self._p.get_all_streams() if self._p.get_label_from_stream_id(s) not in self._hidden]

    def __getattr__(self, name):
        return getattr(self._p, name)


def test_missing_labels(tmp_path, monkeypatch):
    import mmloader.recipes.aria.recipe as aria

    real = aria.open_vrs
    monkeypatch.setattr(aria, "open_vrs", lambda path: _Hiding(real(path), {"imu-left", "camera-rgb"}))
    url = AriaAdapter().prepare(str(AEA), str(tmp_path / "ok"), progress=False)
    ds = mmloader.open(url)
    rep = ds.report()["recordings"]["aea_test_recording"]
    assert sorted(rep["absent"]) == ["camera-rgb", "imu-left"] and "imu-left" not in rep["labels_found"]
    assert set(ds.modalities) == {"imu", "imu_right", "narrations"}
    for kw, missing in (({"imu": "left"}, "imu-left"), ({"imu": "both"}, "imu-left"), ({"rgb": True}, "camera-rgb")):
        with pytest.raises(SourceFormatError, match=missing) as e:
            AriaAdapter().prepare(str(AEA), str(tmp_path / "bad"), progress=False, **kw)
        assert "labels found" in str(e.value) and "imu-right" in str(e.value)
        assert not (tmp_path / "bad").exists()


def test_rectify_applies_factory_calibration(tmp_path, aea_store):
    url = AriaAdapter().prepare(str(AEA), str(tmp_path / "r"), progress=False, rectify=True, rgb=False)
    rect = mmloader.open(url).timeseries("aea_test_recording", "imu_right")
    raw = mmloader.open(aea_store).timeseries("aea_test_recording", "imu_right")
    assert np.array_equal(rect.t_ns, raw.t_ns) and not np.allclose(rect.data, raw.data)
    p = data_provider.create_vrs_data_provider(str(AEA / "recording.vrs"))
    calib = p.get_device_calibration().get_imu_calib("imu-right")
    for i in (0, 199, 399):
        want_a = np.asarray(calib.raw_to_rectified_accel(raw.data[i, :3].astype(np.float64))).ravel()
        want_g = np.asarray(calib.raw_to_rectified_gyro(raw.data[i, 3:].astype(np.float64))).ravel()
        np.testing.assert_allclose(rect.data[i], np.r_[want_a, want_g], rtol=1e-5, atol=1e-5)
    assert mmloader.open(url).report()["recordings"]["aea_test_recording"]["imu_right"]["rectified"] is True


def test_clear_error_without_projectaria_tools(monkeypatch, tmp_path):
    import mmloader.recipes.aria.recipe as aria

    monkeypatch.setitem(sys.modules, "projectaria_tools", None)
    monkeypatch.setitem(sys.modules, "projectaria_tools.core", None)
    with pytest.raises(ImportError, match="pip install projectaria-tools"):
        aria.AriaAdapter().prepare(str(AEA), str(tmp_path / "s"), progress=False)
    assert not (tmp_path / "s").exists()


def test_store_on_an_fsspec_url(tmp_path):
    """A non-local DST: the mp4 is encoded locally, then copied into the store through fsspec."""
    import uuid

    import fsspec

    url = f"memory://aria-{uuid.uuid4().hex[:8]}"
    try:
        AriaAdapter().prepare(str(AEA), url, progress=False, rgb_size=(224, 224))
        ds = mmloader.open(url)
        row = [r for r in ds.streams.to_pylist() if r["stream"] == "video"][0]
        assert row["uri"] == "media/aea_test_recording/camera-rgb.mp4" and ds.validate() == []
        assert fsspec.filesystem("memory").exists(media_url(url, row["uri"]))
        wins = ds.windows(sec=0.2, modalities=["imu", "video"])
        assert len(wins) >= 1 and wins[0]["video"].shape == (1, 3, 224, 224)
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists(url):
            fs.rm(url, recursive=True)
