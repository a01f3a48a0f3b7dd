"""Transcode profiles (``prepare --video-profile``): short GOP, training size, optional fps, capture times kept."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import mmloader
from mmloader.cli import main as cli_main
from mmloader.errors import MediaError
from mmloader.recipes import get_adapter
from mmloader.video import VIDEO_PROFILES, VideoProfile
from mmloader.video.probe import probe_video
from mmloader.video.transcode import kept_frames, resolve_profile, transcode_video

from conftest import make_ego4d_tree

FPS = 25
TB = Fraction(1, 90000)
START_TICKS = 45000  # the first frame at 0.5 s: a non-zero first pts, kept through the transcode
SMALL = VideoProfile("test-64-gop5", gop=5, size=(64, 64), preset="ultrafast")


def brightness(k: int) -> int:
    """The mean level of source frame ``k``: distinct for 180 frames, 1 level apart x 1.2."""
    return 20 + (6 * k) % 216


def write_long_gop(path: Path, codec: str = "libx264", seconds: float = 6.0, gop: int = 120,
                   size: tuple[int, int] = (128, 96)) -> Path:
    """A long-GOP file whose frame k is flat at ``brightness(k)`` with a small bright square marking its parity,
    first pts at 0.5 s (time base 1/90000)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream(codec, rate=FPS)
        s.width, s.height = size
        s.pix_fmt = "yuv420p"
        s.time_base = TB
        s.codec_context.time_base = TB
        s.options = ({"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"} if codec == "libx264"
                     else {"g": str(gop), "keyint_min": str(gop)})
        for k in range(int(seconds * FPS)):
            img = np.full((size[1], size[0], 3), brightness(k), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = START_TICKS + k * int(TB.denominator / FPS), TB
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def decoded_levels(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(pts ns, mean level) of every frame of ``path``, decoded in order by PyAV."""
    info = probe_video(path)
    levels = []
    with av.open(path) as c:
        for f in c.decode(c.streams.video[0]):
            levels.append(f.to_ndarray(format="rgb24").mean())
    return info.pts_ns, np.asarray(levels)


@pytest.fixture(scope="module", params=["libx264", "libvpx-vp9"], ids=["h264", "vp9"])
def source(request, tmp_path_factory) -> Path:
    return write_long_gop(tmp_path_factory.mktemp("src") / "long-gop.mp4", codec=request.param)


# -- profiles --------------------------------------------------------------------------------------------------------


def test_named_profiles_and_their_checks():
    assert set(VIDEO_PROFILES) >= {"224-gop10", "256-gop10", "224-10fps"}
    assert resolve_profile("224-gop10") is VIDEO_PROFILES["224-gop10"]
    assert resolve_profile(VIDEO_PROFILES["224-10fps"].describe()) == VIDEO_PROFILES["224-10fps"]
    with pytest.raises(ValueError, match="unknown video profile 'nope'.*224-gop10"):
        resolve_profile("nope")
    with pytest.raises(ValueError, match="gop"):
        VideoProfile("bad", gop=0)
    with pytest.raises(ValueError, match="size or short_side"):
        VideoProfile("bad", gop=5, size=(64, 64), short_side=64)
    with pytest.raises(ValueError, match="even"):
        VideoProfile("bad", gop=5, size=(63, 64))
    assert VIDEO_PROFILES["256-gop10"].output_size(1920, 1080) == (256, 456)
    assert VIDEO_PROFILES["224-gop10"].output_size(1920, 1080) == (224, 224)


def test_kept_frames_are_nearest_to_a_grid():
    pts = np.arange(0, 3_000_000_000, 33_333_333, dtype=np.int64)  # 30 fps, 3 s
    assert np.array_equal(kept_frames(pts, None), np.arange(pts.size))
    keep = kept_frames(pts, 10.0)
    assert keep.size == 30 and np.all(np.diff(keep) == 3)
    assert np.all(np.abs(pts[keep] - np.arange(30) * 100_000_000) <= 33_333_333 // 2)


# -- the transcode itself --------------------------------------------------------------------------------------------


def test_every_frame_keeps_its_capture_time_and_picture(source, tmp_path):
    src_pts, src_levels = decoded_levels(str(source))
    assert probe_video(str(source)).keyframe.sum() <= 2  # the fixture really is long-GOP
    info, rep = transcode_video(str(source), str(tmp_path / "out.mp4"), SMALL)
    assert (info.width, info.height) == (64, 64) and rep["frames"] == rep["source_frames"] == src_pts.size
    assert np.array_equal(info.pts_ns, src_pts) and rep["max_time_error_ns"] == 0
    assert info.pts_ns[0] == 500_000_000
    assert np.array_equal(np.flatnonzero(info.keyframe), np.arange(0, src_pts.size, SMALL.gop))
    out_pts, out_levels = decoded_levels(str(tmp_path / "out.mp4"))
    assert np.array_equal(out_pts, src_pts)
    assert np.abs(out_levels - src_levels).max() < 2.5  # frame k is frame k (neighbours differ by 6 levels)


def test_a_lower_fps_keeps_source_frames_at_their_own_times(source, tmp_path):
    src_pts, src_levels = decoded_levels(str(source))
    prof = VideoProfile("test-10fps", gop=5, size=(64, 64), fps=10.0, preset="ultrafast")
    info, rep = transcode_video(str(source), str(tmp_path / "out.mp4"), prof)
    pos = np.searchsorted(src_pts, info.pts_ns)
    assert np.array_equal(src_pts[pos], info.pts_ns)  # every output frame is a source frame, at its own time
    assert rep["frames"] == 60 and np.all(np.diff(info.pts_ns) <= 120_000_000)
    _, out_levels = decoded_levels(str(tmp_path / "out.mp4"))
    assert np.abs(out_levels - src_levels[pos]).max() < 2.5


def test_an_undecodable_source_names_the_file_and_leaves_no_output(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)
    out = tmp_path / "out.mp4"
    with pytest.raises(MediaError, match="bad.mp4"):
        transcode_video(str(bad), str(out), SMALL)
    assert not out.exists()


# -- through the recipes ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ego4d_long_gop(tmp_path_factory) -> Path:
    """An Ego4D tree of two 6-s long-GOP H.264 videos (first pts 0.5 s) with IMU."""
    root = make_ego4d_tree(tmp_path_factory.mktemp("ego") / "src", seconds=6.0)
    for uid in ("vid-a", "vid-b"):
        write_long_gop(root / "v2" / "full_scale" / f"{uid}.mp4")
    return root


def _windows(store: str):
    return mmloader.open(store).windows(sec=2.0, stride=1.0, modalities=["imu", "video"], frames=4, size=(64, 64))


def test_ego4d_prepare_with_a_profile_keeps_alignment(ego4d_long_gop, tmp_path):
    plain = get_adapter("ego4d").prepare(str(ego4d_long_gop), str(tmp_path / "plain"), progress=False)
    prof = get_adapter("ego4d").prepare(str(ego4d_long_gop), str(tmp_path / "prof"), progress=False,
                                        video_profile=SMALL)
    ds = mmloader.open(prof)
    assert ds.info()["video_profile"]["name"] == "test-64-gop5"
    assert ds.store.manifest["options"]["video_profile"] == SMALL.describe()
    row = ds.store.stream_row("vid-a", "video")
    assert row["uri"] == "media/vid-a/video.test-64-gop5.mp4"
    rep = ds.report()["recordings"]["vid-a"]["video"]["transcoded"]
    assert rep["profile"]["gop"] == 5 and rep["source"].endswith("vid-a.mp4")
    a, b = _windows(plain), _windows(prof)
    assert len(a) == len(b) > 0
    for i in range(len(a)):
        wa, wb = a[i], b[i]
        assert np.array_equal(wa["video_t"].numpy(), wb["video_t"].numpy())  # the same frames, same times
        assert np.array_equal(wa["imu"].numpy(), wb["imu"].numpy())
        levels_a = wa["video"].float().mean(dim=(1, 2, 3)).numpy()
        levels_b = wb["video"].float().mean(dim=(1, 2, 3)).numpy()
        assert np.abs(levels_a - levels_b).max() < 2.5
    before = b[1]["video"].numpy()
    moved = tmp_path / "moved"  # the transcoded media live inside the store: it can be moved
    shutil.move(prof, moved)
    assert np.array_equal(_windows(str(moved))[1]["video"].numpy(), before)


def test_write_store_with_a_profile(tmp_path):
    src = write_long_gop(tmp_path / "own.mp4", seconds=3.0)
    t = np.arange(0, 3.5, 0.01)
    rec = mmloader.Recording(id="r1", timeseries={"acc": mmloader.TimeSeriesInput(
        (t * 1e9).astype(np.int64), np.stack([t, t, t], 1).astype(np.float32), ["x", "y", "z"], ["m/s2"] * 3)},
        videos={"cam": str(src)})
    url = mmloader.write_store(tmp_path / "store", [rec], video_profile=SMALL)
    ds = mmloader.open(url)
    assert ds.store.stream_row("r1", "cam")["uri"] == "media/r1/cam.test-64-gop5.mp4"
    pts, key = ds.store.video_index("r1", "cam")
    assert np.array_equal(np.asarray(pts), probe_video(str(src)).pts_ns)
    assert ds.info()["video_profile"]["name"] == SMALL.name


def test_copy_media_and_a_profile_exclude_each_other(ego4d_long_gop, tmp_path):
    with pytest.raises(ValueError, match="exclude each other"):
        get_adapter("ego4d").prepare(str(ego4d_long_gop), str(tmp_path / "x"), progress=False, copy_media=True,
                                     video_profile="224-gop10")
    assert not (tmp_path / "x").exists()


def test_cli_prepare_video_profile(tmp_path, capsys):
    root = make_ego4d_tree(tmp_path / "src", uids=("vid-a",), seconds=2.0)
    dst = tmp_path / "store"
    assert cli_main(["prepare", "ego4d", str(root), str(dst), "--video-profile", "224-gop10", "-q"]) == 0
    assert cli_main(["info", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "transcoded with profile 224-gop10: 224x224, keyframe every 10 frames" in out
    manifest = json.loads((dst / "mmloader.json").read_text())
    ds = mmloader.open(str(dst))
    info = probe_video(str(dst / ds.store.stream_row("vid-a", "video")["uri"]))
    assert (info.width, info.height) == (224, 224) and np.all(np.diff(np.flatnonzero(info.keyframe)) == 10)
    assert manifest["options"]["video_profile"]["name"] == "224-gop10"
    # a recipe without the option refuses it (usage error), naming the option
    assert cli_main(["prepare", "aria", str(root), str(tmp_path / "a"), "--video-profile", "224-gop10"]) == 2
    assert "no --video-profile option" in capsys.readouterr().err
