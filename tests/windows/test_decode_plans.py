"""Decode plans: windows read in index order are served from one forward pass per recording.

Fixture: two 10-s recordings at 160x120, 30 fps, H.264 with one keyframe every 250 frames (no scene cuts, B-frames
on), a moving square so every frame differs; 5-s windows at 1-s stride with 4 frames each, so consecutive windows
overlap and window k+1's first frame lies before window k's last.
"""

from __future__ import annotations

import pickle

import av
import numpy as np
import pytest
import torch

import mmloader
from mmloader.recipes.custom import Recording, TimeSeriesInput, write_store
from mmloader.video import available_backends
from mmloader.video.backends import FrameStore, cpus_available, decoder_threads, open_reader, set_decoder_threads

SECONDS, FPS, GOP = 10, 30, 250
SIZE = (48, 64)  # (height, width) of the windows' frames


def write_moving_mp4(path, seconds=SECONDS, fps=FPS, gop=GOP, wh=(160, 120), seed=0) -> str:
    """H.264, a square moving over a gradient (every frame differs), keyframes every ``gop`` frames only."""
    w, h = wh
    rng = np.random.default_rng(seed)
    base = (np.add.outer(np.arange(h), np.arange(w)) % 256).astype(np.uint8)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps, options={"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0",
                                                       "preset": "veryfast"})
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for k in range(int(seconds * fps)):
            img = np.repeat(base[:, :, None], 3, axis=2).copy()
            x, y = (3 * k) % (w - 20), (2 * k) % (h - 20)
            img[y:y + 20, x:x + 20] = rng.integers(0, 256, 3, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plans")
    t = np.arange(SECONDS * 50, dtype=np.int64) * 20_000_000
    recs = []
    for r in range(2):
        mp4 = write_moving_mp4(tmp / f"rec{r}.mp4", seed=r)
        imu = TimeSeriesInput(t, np.random.default_rng(r).standard_normal((len(t), 6)).astype(np.float32),
                              [f"c{j}" for j in range(6)], ["u"] * 6, rate_hz=50.0)
        recs.append(Recording(id=f"rec{r}", timeseries={"imu": imu}, videos={"video": mp4}))
    return write_store(str(tmp / "store"), recs, dataset="plans")


def make_windows(url, backend="pyav"):
    return mmloader.open(url).windows(sec=5, stride=1, modalities=["imu", "video"], frames=4, size=SIZE,
                                      video_backend=backend)


@pytest.fixture(scope="module")
def windows(store_url):
    ws = make_windows(store_url)
    assert len(ws) >= 10 and len(set(ws._columns.recording_id)) == 2
    return ws


def fresh(ws, **attrs):
    """A copy of ``ws`` with nothing opened yet (as a worker gets it), attributes set."""
    out = pickle.loads(pickle.dumps(ws))
    out.__dict__.update(attrs)
    return out


def readers_by_recording(ws):
    """{recording id: its open reader} (one per recording: the pool holds 4)."""
    urls = {ws._media(rid, "video")[0]: rid for rid in set(ws._columns.recording_id)}
    return {urls[key[0]]: r for key, r in zip(ws.readers._readers, ws.readers._readers.values())}


def needed_frames(ws, rid):
    c = ws._columns
    return np.unique(np.concatenate([c.video_idx["video"][i] for i in range(len(ws)) if c.recording_id[i] == rid]))


def forward_cost(ws, rid):
    """Frames PyAV decodes to read ``rid``'s needed frames in one forward pass: from the keyframe before the first,
    then forward, jumping (seeking forward) to a later keyframe only where a whole GOP lies before the next one."""
    _, key = ws._pts(rid, "video")
    kf = np.flatnonzero(key)
    kf_of = kf[np.searchsorted(kf, np.arange(len(key)), side="right") - 1]
    pos, cost = -1, 0
    for t in needed_frames(ws, rid):
        if pos < 0 or kf_of[t] > pos:
            cost += t - kf_of[t] + 1
        else:
            cost += t - pos
        pos = t
    return cost


def assert_same_samples(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_the_fixture_has_long_gops(windows):
    for rid in set(windows._columns.recording_id):
        _, key = windows._pts(rid, "video")
        assert len(key) == SECONDS * FPS and np.flatnonzero(key).tolist() == [0, GOP]


def test_index_order_decodes_each_needed_frame_once_and_never_seeks_back(windows):
    ws = fresh(windows)
    list(ws.loader(batch_size=4))  # index order: the loader announces the run
    for rid, reader in readers_by_recording(ws).items():
        assert reader.backward_seeks == 0
        assert reader.frames_decoded == forward_cost(ws, rid)  # no frame decoded twice
        assert reader.frames_decoded <= len(ws._pts(rid, "video")[0])
    # each window alone decodes far more: every window goes back to the keyframe
    alone = fresh(windows, decode_plans=False)
    for i in range(len(alone)):
        alone[i]
    for rid, reader in readers_by_recording(alone).items():
        assert reader.backward_seeks > 0 and reader.frames_decoded > 2 * forward_cost(ws, rid)


def test_iteration_and_plain_index_order_reads_use_plans(windows):
    ws = fresh(windows)
    list(ws)  # __iter__ announces the run
    assert all(r.backward_seeks == 0 for r in readers_by_recording(ws).values())
    ws = fresh(windows)
    for i in range(len(ws)):  # detected from i - 1: only window 1 goes back once
        ws[i]
    assert sum(r.backward_seeks for r in readers_by_recording(ws).values()) <= 1


def test_plans_are_bit_identical_to_reading_each_window_alone(windows):
    alone = fresh(windows, decode_plans=False)
    reference = [alone[i] for i in range(len(alone))]
    planned = fresh(windows)
    planned.will_read(range(len(planned)))
    for i in range(len(planned)):
        assert_same_samples(planned[i], reference[i])
    assert len(planned._plan.store) == 0  # nothing left once the last window is read
    shuffled = fresh(windows)
    for i in np.random.default_rng(0).permutation(len(shuffled)):
        assert_same_samples(shuffled[int(i)], reference[int(i)])


def test_shuffled_reads_do_not_read_ahead(windows):
    n = len(windows)
    order = [int(i) for i in np.random.default_rng(1).permutation(n)]
    order = [i for k, i in enumerate(order) if k == 0 or i != order[k - 1] + 1]  # no i right after i - 1
    costs = []
    for plans in (True, False):
        ws = fresh(windows, decode_plans=plans)
        ws.will_read(order)  # not ascending: no run
        for i in order:
            ws[i]
        assert ws._plan is None or len(ws._plan.store) == 0
        costs.append(sum(r.frames_decoded for r in readers_by_recording(ws).values()))
    assert costs[0] == costs[1]


@pytest.mark.parametrize("mb", [0.0, 3 * SIZE[0] * SIZE[1] * 3 / 2**20, 128.0])
def test_the_frame_store_stays_within_its_bound(windows, mb):
    reference = fresh(windows, decode_plans=False)
    ws = fresh(windows, frame_store_mb=mb)
    ws.will_read(range(len(ws)))
    for i in range(len(ws)):
        assert_same_samples(ws[i], reference[i])
        assert ws._plan.store.nbytes <= int(mb * 2**20)
    assert ws._plan.store.peak_bytes <= int(mb * 2**20)
    if mb >= 1:  # room for the overlap: a few windows' frames, far below the bound
        assert 0 < ws._plan.store.peak_bytes <= 6 * 4 * SIZE[0] * SIZE[1] * 3


def test_frame_store_drops_oldest_past_its_bound():
    s = FrameStore(3 * 100)
    for k in range(5):
        s.put("m", k, np.zeros(100, np.uint8))
    assert len(s) == 3 and s.get("m", 0) is None and s.get("m", 4) is not None and s.nbytes == 300
    s.put("n", 0, np.zeros(100, np.uint8))
    s.drop("m", below=4)
    assert s.get("m", 3) is None and s.get("m", 4) is not None and s.get("n", 0) is not None
    s.drop("m")
    assert len(s) == 1 and s.nbytes == 100
    s.put("big", 0, np.zeros(1000, np.uint8))  # larger than the bound: not kept
    assert s.get("big", 0) is None and s.nbytes <= 300


@pytest.mark.parametrize("backend", [b for b in ("decord", "torchcodec") if b in available_backends()])
def test_every_backend_gets_the_plan(store_url, backend):
    ws = make_windows(store_url, backend)
    reference = fresh(ws, decode_plans=False)
    planned = fresh(ws)
    planned.will_read(range(len(planned)))
    for i in range(len(planned)):
        assert_same_samples(planned[i], reference[i])
    for rid, reader in readers_by_recording(planned).items():
        assert reader.backend == backend
        assert reader.frames_decoded == len(needed_frames(planned, rid))  # each frame asked for once


def test_decoder_threads(store_url, windows):
    assert decoder_threads() == cpus_available() >= 1
    url, _, _ = windows._media(windows._columns.recording_id[0], "video")
    pts, key = windows._pts(windows._columns.recording_id[0], "video")
    try:
        set_decoder_threads(1)
        r = open_reader("pyav", url, pts, key, SIZE)
        assert r._stream.thread_count == 1
        r.close()
    finally:
        set_decoder_threads(None)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="decoder threads"):
            set_decoder_threads(bad)


def test_a_cache_fill_decodes_forward_across_its_shards(windows, tmp_path):
    ws = fresh(windows)
    cached = ws.cache(str(tmp_path / "cache"), fill="eager", shard_size=4, progress=False)
    assert len(cached) == len(ws) and cached.window_cache.n_shards > 2
    for rid, reader in readers_by_recording(ws).items():
        assert reader.backward_seeks == 0
        assert reader.frames_decoded == forward_cost(ws, rid)
    for i in (0, len(ws) - 1):
        assert_same_samples(cached[i], windows[i])
