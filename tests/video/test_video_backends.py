"""Every backend selects the same frame as PyAV (the reference) for the same timestamps."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mmloader.video.probe import probe_video
from mmloader.video import ReaderPool, available_backends, nearest_frames, open_reader, resolve_backend
from mmloader.video import backends as backends_module
from mmloader.video.backends import backend_problems

from conftest import write_mp4

BACKENDS = [b for b in ("pyav", "decord", "torchcodec") if b in available_backends()]
REQUIRE_TORCHCODEC = os.environ.get("MMLOADER_REQUIRE_TORCHCODEC") == "1"


def _backend_param(name: str):
    """Every backend is a test case; one that cannot decode here is skipped, saying why — except torchcodec
    where CI requires it (MMLOADER_REQUIRE_TORCHCODEC=1): then it runs, and fails if it cannot decode."""
    why = backend_problems([name])[name]
    if why is None or (name == "torchcodec" and REQUIRE_TORCHCODEC):
        return name
    return pytest.param(name, marks=pytest.mark.skip(reason=f"{name} cannot decode here: {why}"))


@pytest.fixture(scope="module", params=[("libx264", "mp4"), ("libvpx-vp9", "mp4")], ids=["h264", "vp9"])
def video(request, tmp_path_factory):
    codec, ext = request.param
    path = write_mp4(tmp_path_factory.mktemp("v") / f"clip.{ext}", seconds=8, fps=25, size=(64, 48), codec=codec)
    return str(path), probe_video(str(path))


def test_backends_installed_here():
    """PyAV is always there and the default; decord on x86_64; torchcodec where CI asks for it."""
    import platform

    assert "pyav" in BACKENDS and resolve_backend("auto", "/x.mp4") == "pyav"
    if platform.machine() == "x86_64":
        assert "decord" in BACKENDS
    if REQUIRE_TORCHCODEC:
        assert "torchcodec" in BACKENDS, ("CI installs FFmpeg and torchcodec: this backend must be tested there, but "
                                          f"{backend_problems(['torchcodec'])['torchcodec']}")


@pytest.mark.parametrize("backend", [_backend_param(b) for b in ("pyav", "decord", "torchcodec")])
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


@pytest.mark.parametrize("backend", [_backend_param("torchcodec")])
def test_torchcodec_resizes_inside_the_decoder(video, backend):
    """Only kept frames are converted, at the kept size: torchcodec's Resize decoder transform, not a torch resize of
    full frames afterwards (where the installed torchcodec has decoder transforms)."""
    pytest.importorskip("torchcodec.transforms")
    url, info = video
    reader = open_reader(backend, url, info.pts_ns, info.keyframe, size=(24, 32))
    assert reader._resize_after is False
    frames = reader.get_frames([0, 10, 20])
    assert frames.shape == (3, 24, 32, 3)
    assert np.all(np.abs(frames.mean(axis=(1, 2, 3)) - np.array([0, 50, 100])) < 2.5)
    reader.close()


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


def test_available_backends_are_probed_once_and_can_decode(monkeypatch):
    """A backend is listed only when it decodes a real mp4 here; the probe runs once per process and backend."""
    calls = []
    real = backends_module._why_not
    monkeypatch.setattr(backends_module, "_PROBED", {})
    monkeypatch.setattr(backends_module, "_why_not", lambda b: calls.append(b) or real(b))
    first = available_backends()
    assert available_backends() == first and resolve_backend("pyav") == "pyav"
    assert sorted(calls) == ["decord", "pyav", "torchcodec"]  # once each, not once per call
    assert "pyav" in first
    problems = backend_problems()
    assert [b for b, why in problems.items() if why is None] == first
    assert all(isinstance(why, str) and why for b, why in problems.items() if b not in first)


def test_a_backend_that_imports_but_cannot_decode_is_not_listed(monkeypatch):
    """torchcodec imports without FFmpeg's shared libraries but cannot decode: simulated for any backend."""
    def broken(backend, path):
        raise RuntimeError("Could not load libtorchcodec. Likely causes: FFmpeg is not properly installed")

    monkeypatch.setattr(backends_module, "_PROBED", {})
    monkeypatch.setattr(backends_module, "_decode_probe", broken)
    assert available_backends() == []
    assert "FFmpeg" in backend_problems(["torchcodec"])["torchcodec"]
    with pytest.raises(ValueError, match=r"video backend 'torchcodec' cannot decode on this machine: .*FFmpeg"):
        resolve_backend("torchcodec")
    with pytest.raises(ValueError, match=r"video backend 'decord' cannot decode on this machine: decord imports but "
                                         r"cannot decode a small H.264 mp4 \(RuntimeError"):
        resolve_backend("decord")
    assert resolve_backend("auto") == "pyav"


@pytest.mark.skipif(REQUIRE_TORCHCODEC or backend_problems(["torchcodec"])["torchcodec"] is None,
                    reason="torchcodec decodes here")
def test_torchcodec_without_ffmpeg_says_why():
    """On a machine without FFmpeg's libraries (or without torchcodec) choosing torchcodec is a clear error."""
    assert "torchcodec" not in available_backends()
    with pytest.raises(ValueError, match="video backend 'torchcodec' cannot decode on this machine"):
        resolve_backend("torchcodec")
