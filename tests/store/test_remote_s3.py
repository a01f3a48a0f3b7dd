"""A store on an S3-compatible server started on loopback by this test (moto's server mode), through s3fs.

Nothing is mocked inside fsspec: real HTTP requests go to a real S3 API implementation on 127.0.0.1.
"""

from __future__ import annotations

import fsspec
import pytest
import torch

import mmloader
from mmloader.recipes.ego4d.recipe import Ego4DAdapter


@pytest.fixture(scope="module")
def s3(s3_options):
    """The loopback S3 server of tests/conftest.py (moto's server mode, in the dev extra)."""
    return s3_options


@pytest.fixture(scope="module")
def sample_src(sample_store):
    return sample_store.source(videos=3, seconds=12, seed=9, defect_fraction=0.5)


@pytest.mark.timeout(180)
def assert_same_windows(ds_l, ds_r):
    """The local and the remote store give the same 4-s IMU + video windows; returns both window sets."""
    wl = ds_l.windows(sec=4, modalities=["imu", "video"], frames=2, size=(32, 40))
    wr = ds_r.windows(sec=4, modalities=["imu", "video"], frames=2, size=(32, 40))
    assert wl.report() == wr.report() and len(wl) == len(wr) > 0
    for i in range(len(wl)):
        a, b = wl[i], wr[i]
        for k in ("imu", "imu_mask", "video", "video_t"):
            assert torch.equal(a[k], b[k]), k
    return wl, wr


def test_store_on_s3_yields_the_same_windows_as_local(s3, sample_src, tmp_path):
    local = Ego4DAdapter().prepare(str(sample_src), str(tmp_path / "store"), progress=False)
    remote = Ego4DAdapter().prepare(str(sample_src), "s3://mmtest/stores/ego4d", progress=False, storage_options=s3)
    assert remote == "s3://mmtest/stores/ego4d"
    fs = fsspec.filesystem("s3", **s3)
    assert fs.exists("mmtest/stores/ego4d/mmloader.json")
    ds_l, ds_r = mmloader.open(local), mmloader.open(remote, storage_options=s3)
    assert ds_r.validate() == []
    assert ds_l.recordings.equals(ds_r.recordings)
    assert ds_l.streams.drop(["uri", "index_uri"]).equals(ds_r.streams.drop(["uri", "index_uri"]))
    wl, wr = assert_same_windows(ds_l, ds_r)
    # and through the loader with a worker process (the store reopens from its URL there)
    la = [b["imu"] for b in wl.loader(batch_size=4, num_workers=1)]
    lb = [b["imu"] for b in wr.loader(batch_size=4, num_workers=1)]
    assert all(torch.equal(x, y) for x, y in zip(la, lb))


def test_interrupted_prepare_on_s3_leaves_nothing_that_opens(s3, sample_src, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(sample_src, bad)
    mp4 = sorted((bad / "v2" / "full_scale").glob("*.mp4"))[-1]
    mp4.write_bytes(mp4.read_bytes()[:500])
    with pytest.raises(mmloader.MediaError):
        Ego4DAdapter().prepare(str(bad), "s3://mmtest/stores/bad", progress=False, storage_options=s3)
    fs = fsspec.filesystem("s3", **s3)
    assert not fs.exists("mmtest/stores/bad/mmloader.json")
    with pytest.raises(mmloader.StoreFormatError):
        mmloader.open("s3://mmtest/stores/bad", storage_options=s3)


@pytest.mark.timeout(240)
def test_store_and_its_mp4s_on_s3_yield_the_same_windows_as_local(s3, sample_src, tmp_path):
    """prepare(copy_media=True) to S3: the mp4s are uploaded into the store (media/, relative uris) and
    decoded from S3 through the store's storage_options (PyAV on an fsspec file object)."""
    local = Ego4DAdapter().prepare(str(sample_src), str(tmp_path / "store"), progress=False)
    remote = Ego4DAdapter().prepare(str(sample_src), "s3://mmtest/stores/ego4d-media", progress=False,
                                    storage_options=s3, copy_media=True)
    fs = fsspec.filesystem("s3", **s3)
    ds_l, ds_r = mmloader.open(local), mmloader.open(remote, storage_options=s3)
    assert ds_r.validate() == []
    videos = [r for r in ds_r.streams.to_pylist() if r["kind"] == "video"]
    assert videos and all(r["uri"] == f"media/{r['recording_id']}.mp4" for r in videos)
    for r in videos:  # on S3, identical to the source file
        assert fs.size(f"mmtest/stores/ego4d-media/{r['uri']}") == r["media_size"]
        assert r["media_hash"] == ds_l.store.stream_row(r["recording_id"], "video")["media_hash"]
    wl, wr = assert_same_windows(ds_l, ds_r)
    opened = [url for url, _ in wr.readers._readers]
    assert opened and all(u.startswith("s3://mmtest/stores/ego4d-media/media/") for u in opened)
    # through the loader with a worker process: the store (and its storage_options) reopen there
    va = [b["video"] for b in wl.loader(batch_size=4, num_workers=1)]
    vb = [b["video"] for b in wr.loader(batch_size=4, num_workers=1)]
    assert len(va) == len(vb) > 0 and all(torch.equal(x, y) for x, y in zip(va, vb))
    # another video uploaded over one of them: the next read of that recording raises, naming it
    rid = videos[0]["recording_id"]
    other = next(p for p in sorted((sample_src / "v2" / "full_scale").glob("*.mp4")) if p.stem != rid)
    fs.put(str(other), f"mmtest/stores/ego4d-media/media/{rid}.mp4")
    fresh = mmloader.open(remote, storage_options=s3).windows(sec=4, modalities=["imu", "video"], frames=2,
                                                              size=(32, 40))
    i = fresh.index["recording_id"].to_pylist().index(rid)
    with pytest.raises(mmloader.MediaError, match=rf"s3://mmtest/stores/ego4d-media/media/{rid}\.mp4: .*'{rid}'"):
        fresh[i]
