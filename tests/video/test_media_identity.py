"""Media identity (size, mtime, fast hash recorded at prepare, checked when a reader opens a file) and
relocatable stores (media inside a store referenced relative to its root). Real mp4s encoded with PyAV,
genuine Aria VRS files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import mmloader
from mmloader.recipes.aria.recipe import AriaAdapter
from mmloader.recipes.ego4d.recipe import Ego4DAdapter
from mmloader.cli import main as cli_main
from mmloader.errors import MediaError
from mmloader.video.probe import (
    HASH_SPAN,
    MediaIdentity,
    check_store_media,
    fast_hash,
    media_identity,
    media_storage_options,
    media_url,
    verify_media,
)

from conftest import make_ego4d_tree, write_mp4

ARIA = Path(os.environ.get("MMLOADER_SHARED", Path(__file__).resolve().parents[3] / "shared")) / "data" / "aria"
ADT = ARIA / "adt_test"  # the smallest genuine recording: 3 RGB frames


def _windows(url: str):
    return mmloader.open(url).windows(sec=1, modalities=["imu", "video"], frames=2, size=(24, 32))


def _all(ws) -> list[dict]:
    return [ws[i] for i in range(len(ws))]


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x["recording_id"] == y["recording_id"] and x["t0"] == y["t0"]
        for k in ("imu", "imu_mask", "video", "video_t"):
            assert torch.equal(x[k], y[k]), k


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_ego4d_tree(tmp_path / "ego4d", seconds=3.0)


def test_identity_recorded_at_prepare(tree, tmp_path):
    url = Ego4DAdapter().prepare(str(tree), str(tmp_path / "s"), progress=False)
    rows = [r for r in mmloader.open(url).streams.to_pylist() if r["kind"] == "video"]
    assert len(rows) == 2
    for r in rows:
        mp4 = tree / "v2" / "full_scale" / f"{r['recording_id']}.mp4"
        assert r["uri"] == str(mp4)  # external media: absolute
        st = os.stat(mp4)
        assert r["media_size"] == st.st_size and r["media_mtime_ns"] == st.st_mtime_ns
        assert r["media_hash"] == fast_hash(str(mp4)) and r["media_hash"].startswith("headtail-sha256:")
        assert MediaIdentity.from_row(r) == media_identity(str(mp4))
    for r in mmloader.open(url).streams.to_pylist():  # non-media rows carry no identity
        if r["kind"] != "video":
            assert r["media_size"] is None and r["media_hash"] is None


def test_replaced_source_mp4_raises_on_next_read(tree, tmp_path):
    url = Ego4DAdapter().prepare(str(tree), str(tmp_path / "s"), progress=False)
    ws = _windows(url)
    ids = ws.index["recording_id"].to_pylist()
    ia, ib = ids.index("vid-a"), ids.index("vid-b")
    before = ws[ia]  # vid-a's reader is open in the pool now
    mp4 = tree / "v2" / "full_scale" / "vid-a.mp4"
    write_mp4(mp4, seconds=3.0, size=(80, 60))  # another video of the same length, written over it in place
    with pytest.raises(MediaError) as e:
        ws[ia]  # the same set: its open reader is not trusted any more
    msg = str(e.value)
    assert str(mp4) in msg and "'vid-a'" in msg and "size" in msg
    with pytest.raises(MediaError, match="vid-a"):
        _windows(url)[ia]  # a fresh set, a fresh reader
    problems = check_store_media(mmloader.open(url).store)
    assert len(problems) == 1 and "'vid-a'" in problems[0]
    assert cli_main(["validate", url]) == 1  # the deep check reports the replaced media file too
    assert any("vid-a.mp4" in p for p in mmloader.open(url).validate())
    assert torch.is_tensor(ws[ib]["video"])  # the other recording still reads
    assert before["video"].shape == (2, 3, 24, 32)


def test_same_size_other_content_is_caught_by_the_hash(tree, tmp_path):
    url = Ego4DAdapter().prepare(str(tree), str(tmp_path / "s"), progress=False)
    mp4 = tree / "v2" / "full_scale" / "vid-b.mp4"
    data = bytearray(mp4.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size; small files are hashed whole
    mp4.write_bytes(bytes(data))
    ws = _windows(url)
    ib = ws.index["recording_id"].to_pylist().index("vid-b")
    with pytest.raises(MediaError, match=r"content hash .* differs .*another file sits at this path") as e:
        ws[ib]
    assert "'vid-b'" in str(e.value) and str(mp4) in str(e.value)


def test_validate_hashes_media_even_when_the_mtime_was_set_back(tree, tmp_path):
    """A reader trusts an unchanged (size, mtime) — one stat per open; ``validate`` never does."""
    url = Ego4DAdapter().prepare(str(tree), str(tmp_path / "s"), progress=False)
    assert mmloader.open(url).validate() == []
    mp4 = tree / "v2" / "full_scale" / "vid-b.mp4"
    st = mp4.stat()
    data = bytearray(mp4.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size
    mp4.write_bytes(bytes(data))
    os.utime(mp4, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the recorded mtime put back
    problems = mmloader.open(url).validate()
    assert len(problems) == 1 and "vid-b.mp4" in problems[0] and "content hash" in problems[0]
    assert cli_main(["validate", url]) == 1


def test_new_mtime_same_content_is_accepted(tree, tmp_path):
    """A copy (cp, upload) changes mtime, not content: the hash decides, no error."""
    url = Ego4DAdapter().prepare(str(tree), str(tmp_path / "s"), progress=False)
    ref = _all(_windows(url))
    for mp4 in (tree / "v2" / "full_scale").glob("*.mp4"):
        st = os.stat(mp4)
        os.utime(mp4, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    _same(_all(_windows(url)), ref)


def test_missing_media_names_file_and_recording(tree, tmp_path):
    url = Ego4DAdapter().prepare(str(tree), str(tmp_path / "s"), progress=False)
    ws = _windows(url)
    ia = ws.index["recording_id"].to_pylist().index("vid-a")
    os.remove(tree / "v2" / "full_scale" / "vid-a.mp4")
    with pytest.raises(MediaError, match=r"vid-a.mp4: media file of recording 'vid-a' stream 'video' not found"):
        ws[ia]


def test_copy_media_store_is_self_contained_and_movable(tree, tmp_path):
    ref = _all(_windows(Ego4DAdapter().prepare(str(tree), str(tmp_path / "ref"), progress=False)))
    url = Ego4DAdapter().prepare(str(tree), str(tmp_path / "s"), progress=False, copy_media=True)
    ds = mmloader.open(url)
    rows = {r["recording_id"]: r for r in ds.streams.to_pylist() if r["kind"] == "video"}
    assert rows["vid-a"]["uri"] == "media/vid-a.mp4" and (tmp_path / "s" / "media" / "vid-a.mp4").is_file()
    assert ds.store.manifest["options"]["copy_media"] is True and ds.validate() == []
    moved = tmp_path / "elsewhere" / "store"
    moved.parent.mkdir()
    shutil.move(str(tmp_path / "s"), str(moved))
    shutil.rmtree(tree)  # the source is gone: only the store's own media remain
    _same(_all(_windows(str(moved))), ref)


def test_cli_prepare_copy_media(tree, tmp_path):
    assert cli_main(["prepare", "ego4d", str(tree), str(tmp_path / "s"), "--copy-media", "-q"]) == 0
    shutil.copytree(tmp_path / "s", tmp_path / "copy", copy_function=shutil.copyfile)  # new mtimes
    shutil.rmtree(tmp_path / "s")
    shutil.rmtree(tree)
    ws = _windows(str(tmp_path / "copy"))
    assert len(ws) > 0 and ws[0]["video"].shape == (2, 3, 24, 32)


def test_copied_aria_store_reads_its_own_media(tmp_path):
    """Before: the Aria store's uri was an absolute path into the original store's media/."""
    src = AriaAdapter().prepare(str(ADT), str(tmp_path / "orig"), progress=False, rgb_size=(128, 128))
    ds = mmloader.open(src)
    row = [r for r in ds.streams.to_pylist() if r["stream"] == "video"][0]
    assert row["uri"] == "media/adt_test/camera-rgb.mp4"
    assert media_url(ds.store.url, row["uri"]) == str(tmp_path / "orig" / "media" / "adt_test" / "camera-rgb.mp4")
    spec = dict(sec=0.05, modalities=["imu", "video"])
    ref = [ds.windows(**spec)[i] for i in range(len(ds.windows(**spec)))]
    assert len(ref) > 0
    shutil.copytree(tmp_path / "orig", tmp_path / "copy")
    shutil.rmtree(tmp_path / "orig")
    ws = mmloader.open(str(tmp_path / "copy")).windows(**spec)
    assert ws.video_backend == "pyav" and len(ws) == len(ref)
    for i in range(len(ws)):
        for k in ("imu", "video", "video_t"):
            assert torch.equal(ws[i][k], ref[i][k]), k
    assert ws.readers._readers and all(u.startswith(str(tmp_path / "copy")) for u, _ in ws.readers._readers)


def _iso_box(kind: bytes, payload: bytes) -> bytes:
    return (8 + len(payload)).to_bytes(4, "big") + kind + payload


def test_fast_hash_covers_size_head_tail_and_a_moov_in_the_middle(tmp_path):
    moov = _iso_box(b"moov", b"m" * 1000)
    parts = [_iso_box(b"ftyp", b"isom0000"), _iso_box(b"free", b"\0" * (2 * HASH_SPAN)), moov,
             _iso_box(b"mdat", b"\1" * (2 * HASH_SPAN))]
    f = tmp_path / "x.mp4"
    f.write_bytes(b"".join(parts))
    base = fast_hash(str(f))
    moov_at = len(parts[0]) + len(parts[1]) + 100

    def flipped(pos: int) -> str:
        b = bytearray(f.read_bytes())
        b[pos] ^= 1
        g = tmp_path / f"flip{pos}.mp4"
        g.write_bytes(bytes(b))
        return fast_hash(str(g))

    assert flipped(10) != base  # head
    assert flipped(f.stat().st_size - 10) != base  # tail
    assert flipped(moov_at) != base  # the moov box, between head and tail
    assert flipped(len(parts[0]) + HASH_SPAN + 10) == base  # the middle of other boxes: not read (documented)
    g = tmp_path / "longer.mp4"
    g.write_bytes(f.read_bytes() + b"\0")
    assert fast_hash(str(g)) != base


def test_verify_media_rules(tmp_path):
    mp4 = write_mp4(tmp_path / "a.mp4", seconds=1)
    ident = media_identity(str(mp4))
    assert verify_media(str(mp4), ident, recording_id="r") == (ident.size, ident.mtime_ns)
    # unknown mtime (a filesystem without one): hashed, accepted
    verify_media(str(mp4), MediaIdentity(ident.size, None, ident.hash))
    with pytest.raises(MediaError, match=r"recording 'r' stream 'video' is not the one prepared: size"):
        verify_media(str(mp4), MediaIdentity(ident.size + 1, ident.mtime_ns, ident.hash), recording_id="r")
    with pytest.raises(MediaError, match="content hash"):
        verify_media(str(mp4), MediaIdentity(ident.size, ident.mtime_ns + 1, "headtail-sha256:00"), recording_id="r")


def test_media_location_helpers():
    assert media_url("/data/store", "media/r.mp4") == "/data/store/media/r.mp4"
    assert media_url("s3://b/store", "media/r.mp4") == "s3://b/store/media/r.mp4"
    assert media_url("s3://b/store", "/src/r.mp4") == "/src/r.mp4"
    assert media_url("/data/store", "s3://b/r.mp4") == "s3://b/r.mp4"
    opts = {"key": "k"}
    assert media_storage_options("s3://b/store", "s3://b/store/media/r.mp4", opts) == opts
    assert media_storage_options("s3://b/store", "s3://other/r.mp4", opts) == opts  # same object store
    assert media_storage_options("s3://b/store", "/src/r.mp4", opts) == {}  # never S3 keys to a local file
    assert media_storage_options("/data/store", "/data/store/media/r.mp4", None) == {}


def test_reader_pool_reopens_a_changed_local_file(tmp_path):
    from mmloader.video.probe import probe_video
    from mmloader.video import ReaderPool

    mp4 = write_mp4(tmp_path / "a.mp4", seconds=1)
    info, ident = probe_video(str(mp4)), media_identity(str(mp4))
    pool = ReaderPool("pyav", capacity=2)
    r = pool.get(str(mp4), info.pts_ns, info.keyframe, identity=ident, recording_id="r")
    assert pool.get(str(mp4), info.pts_ns, info.keyframe, identity=ident, recording_id="r") is r  # unchanged: hit
    st = os.stat(mp4)
    os.utime(mp4, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # touched: reopened, re-hashed, same content
    r2 = pool.get(str(mp4), info.pts_ns, info.keyframe, identity=ident, recording_id="r")
    assert r2 is not r
    assert np.allclose(r2.get_frames([0, 5]).mean(axis=(1, 2, 3)), [0, 25], atol=2.5)  # frame k: brightness 5k
    pool.close()


def test_remote_media_decode_with_pyav_when_decord_is_asked(tmp_path):
    """decord reads local paths only: a remote URL is decoded by PyAV (warned), the reader says so."""
    import uuid

    import fsspec

    from mmloader.video.probe import copy_media, probe_video
    from mmloader.video import available_backends, open_reader

    mp4 = write_mp4(tmp_path / "a.mp4", seconds=1)
    url = f"memory://media-{uuid.uuid4().hex[:8]}/a.mp4"
    copy_media(str(mp4), url)
    try:
        info, ident = probe_video(url), media_identity(url)
        assert ident.size == mp4.stat().st_size and ident.hash == fast_hash(str(mp4))
        from mmloader.video import backends

        backends._WARNED_REMOTE.discard("decord")  # warned once per process
        for backend in [b for b in ("pyav", "decord") if b in available_backends()]:
            remote = pytest.warns(UserWarning, match="decord reads local files only")
            expect = remote if backend == "decord" else _nothing()
            with expect:
                r = open_reader(backend, url, info.pts_ns, info.keyframe, identity=ident, recording_id="a")
            assert r.backend == "pyav"
            assert np.allclose(r.get_frames([0, 5]).mean(axis=(1, 2, 3)), [0, 25], atol=2.5)
            r.close()
    finally:
        fsspec.filesystem("memory").rm(url.rsplit("/", 1)[0], recursive=True)


def _nothing():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.timeout(120)
def test_replaced_mp4_raises_media_error_through_loader_workers(tree, tmp_path):
    url = Ego4DAdapter().prepare(str(tree), str(tmp_path / "s"), progress=False)
    ws = _windows(url)
    write_mp4(tree / "v2" / "full_scale" / "vid-b.mp4", seconds=3.0, size=(80, 60))
    with pytest.raises(MediaError, match=r"vid-b\.mp4: media file of recording 'vid-b'"):
        for _ in ws.loader(batch_size=2, num_workers=1):
            pass


def test_byo_store_records_and_checks_media_identity(tmp_path):
    from mmloader.recipes.custom import Recording, write_store

    mp4 = write_mp4(tmp_path / "cam.mp4", seconds=2.0)
    url = write_store(tmp_path / "store", [Recording(id="r1", videos={"video": mp4})], dataset="mine")
    ds = mmloader.open(url)
    row = ds.store.stream_row("r1", "video")
    assert row["media_size"] == mp4.stat().st_size and row["media_hash"]
    ws = ds.windows(sec=1.0, modalities=["video"], frames=1, size=(32, 32))
    assert len(ws) and ws[0]["video"].shape == (1, 3, 32, 32)
    write_mp4(mp4, seconds=2.0, size=(80, 60))  # replaced in place by another video of the same length
    with pytest.raises(MediaError, match="cam.mp4"):
        ds.windows(sec=1.0, modalities=["video"], frames=1, size=(32, 32))[0]
