"""Every backend selects the same frame as PyAV (the reference) for the same timestamps."""

from __future__ import annotations

import numpy as np
import pytest

from mmloader.media import probe_video
from mmloader.video import ReaderPool, available_backends, nearest_frames, open_reader, resolve_backend

from conftest import write_mp4

BACKENDS = [b for b in ("pyav", "decord", "torchcodec") if b in available_backends()]


@pytest.fixture(scope="module", params=[("libx264", "mp4"), ("libvpx-vp9", "mp4")], ids=["h264", "vp9"])
def video(request, tmp_path_factory):
    codec, ext = request.param
    path = write_mp4(tmp_path_factory.mktemp("v") / f"clip.{ext}", seconds=8, fps=25, size=(64, 48), codec=codec)
    return str(path), probe_video(str(path))


def test_backends_installed_here():
    """PyAV is always there and the default; decord on x86_64; torchcodec where CI asks for it."""
    import os
    import platform

    assert "pyav" in BACKENDS and resolve_backend("auto", "/x.mp4") == "pyav"
    if platform.machine() == "x86_64":
        assert "decord" in BACKENDS
    if os.environ.get("MMLOADER_REQUIRE_TORCHCODEC") == "1":
        assert "torchcodec" in BACKENDS, "CI installs FFmpeg and torchcodec: this backend must be tested there"


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_frame_as_pyav(video, backend):
    url, info = video
    rng = np.random.default_rng(0)
    targets = np.sort(rng.integers(info.pts_ns[0], info.pts_ns[-1], 40))
    targets = np.concatenate([targets, info.pts_ns[[0, -1]], info.pts_ns[50:52] + 19_999_999])
    idx, err = nearest_frames(info.pts_ns, targets)
    assert np.all(err <= 20_000_000)  # half of the 40 ms period
    ref = open_reader("pyav", url, info.pts_ns, info.keyframe)
    got = open_reader(backend, url, info.pts_ns, info.keyframe)
    # frame k has brightness 5k mod 256: compare both to the expected frame number, not only to each other
    a = ref.get_frames(idx).mean(axis=(1, 2, 3))
    b = got.get_frames(idx).mean(axis=(1, 2, 3))
    expected = (5 * idx) % 256
    assert np.all(np.abs(a - expected) < 2.5), (a, expected)
    assert np.all(np.abs(b - a) < 2.5)
    # random access in any order, and resizing at decode time
    shuffled = idx[rng.permutation(len(idx))]
    assert np.all(np.abs(got.get_frames(shuffled).mean(axis=(1, 2, 3)) - (5 * shuffled) % 256) < 2.5)
    small = open_reader(backend, url, info.pts_ns, info.keyframe, size=(24, 32)).get_frames(idx[:3])
    assert small.shape == (3, 24, 32, 3)
    ref.close()
    got.close()


def test_pyav_seeks_sparsely(video):
    """Reading a late frame after an early one must not decode everything in between twice."""
    url, info = video
    r = open_reader("pyav", url, info.pts_ns, info.keyframe)
    out = r.get_frames([0, 1, 2, len(info.pts_ns) - 1, 3])
    assert np.allclose(out.mean(axis=(1, 2, 3)), (5 * np.array([0, 1, 2, len(info.pts_ns) - 1, 3])) % 256, atol=2.5)


def test_reader_pool_is_a_bounded_lru(tmp_path):
    paths = [str(write_mp4(tmp_path / f"{i}.mp4", seconds=1, fps=10)) for i in range(4)]
    infos = [probe_video(p) for p in paths]
    pool = ReaderPool("pyav", capacity=2)
    readers = [pool.get(p, i.pts_ns, i.keyframe) for p, i in zip(paths, infos)]
    assert len(pool) == 2
    assert pool.get(paths[3], infos[3].pts_ns, infos[3].keyframe) is readers[3]  # hit
    with pytest.raises(Exception):
        readers[0].get_frames([0])  # evicted readers are closed
    pool.close()
    assert len(pool) == 0


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown video backend 'ffplay'"):
        resolve_backend("ffplay")
