"""Windows on a grid that is the stream's own clock are copies of its rows (``Store.regular_run``): bit-identical to
resampling, across chunk boundaries, next to gaps, at the stream's end; anything irregular takes the general path."""

from __future__ import annotations

import numpy as np
import pytest

import mmloader

P = 5_000_000  # 200 Hz


def _recordings():
    rng = np.random.default_rng(3)

    def ts(t):
        return mmloader.TimeSeriesInput(t, rng.standard_normal((t.size, 6)).astype(np.float32), list("abcdef"),
                                        ["u"] * 6, rate_hz=200.0)

    t = 2_000_000_000 + np.arange(9000, dtype=np.int64) * P  # 45 s: three 4096-row chunks
    gap = np.concatenate([t[:3000], t[3000:] + 100 * P])  # a 0.5-s gap after sample 2999
    jitter = t.copy()
    jitter[5000:5300] += rng.integers(-P // 20, P // 20, 300)  # one irregular stretch inside chunk 1
    slow = 2_000_000_000 + np.arange(4000, dtype=np.int64) * 2 * P  # 100 Hz: interpolated, never a run
    offgrid = t + P // 3  # regular, but between the grid points of windows that start on whole strides
    return [mmloader.Recording(id=rid, timeseries={"imu": ts(tt)})
            for rid, tt in (("regular", t), ("gap", gap), ("jitter", jitter), ("slow", slow), ("offgrid", offgrid))]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return mmloader.write_store(tmp_path_factory.mktemp("runs") / "s", _recordings())


def _all(ws, fast: bool):
    if not fast:
        ws.store.regular_run = lambda *a, **k: None  # the general path (resample) only
    return [ws[i] for i in range(len(ws))]


@pytest.mark.parametrize("sec,stride", [(2.0, 0.5), (5.0, 1.25), (0.005, 0.005)])
def test_runs_are_bit_identical_to_resampling(store, sec, stride):
    ds = mmloader.open(store)
    ws_fast = ds.windows(sec=sec, stride=stride, modalities=["imu"])
    ws_slow = mmloader.open(store).windows(sec=sec, stride=stride, modalities=["imu"])
    if sec == 0.005:  # a one-sample window: no step to check
        assert ws_fast[0]["imu"].shape[1] == 1
    calls = {"run": 0}
    real = ws_fast.store.regular_run

    def counting(*a, **k):
        out = real(*a, **k)
        calls["run"] += out is not None
        return out

    ws_fast.store.regular_run = counting
    fast, slow = _all(ws_fast, True), _all(ws_slow, False)
    assert len(fast) == len(slow) > 0
    for a, b in zip(fast, slow):
        assert a["recording_id"] == b["recording_id"] and a["t0"] == b["t0"]
        for key in ("imu", "imu_mask"):
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
            assert a[key].numpy().tobytes() == b[key].numpy().tobytes(), (a["recording_id"], a["t0"], key)
    if sec > 0.005:
        by_rec = {}
        for a in fast:
            by_rec.setdefault(a["recording_id"], []).append(a)
        assert calls["run"] > len(by_rec["regular"]) // 2  # the fast path really ran
        assert any(not w["imu_mask"].all() for w in by_rec["gap"])  # windows over the gap are masked, as before


def test_regular_run_rules(store):
    s = mmloader.open(store).store
    t0 = 2_000_000_000
    run = s.regular_run("regular", "imu", t0 + 4000 * P, 400, P)  # across the chunk boundary at 4096
    assert run is not None and run.shape == (400, 6)
    full = s.read_timeseries("regular", "imu").data
    assert np.array_equal(run, full[4000:4400])
    assert s.regular_run("regular", "imu", t0 + 8800 * P, 200, P) is not None  # ends on the last sample
    assert s.regular_run("regular", "imu", t0 + 8900 * P, 200, P) is None  # runs past the end
    assert s.regular_run("regular", "imu", t0 + 10 * P + 1, 100, P) is None  # between samples
    assert s.regular_run("gap", "imu", t0 + 2900 * P, 100, P) is None  # the interval after the last is the gap
    assert s.regular_run("gap", "imu", t0 + 2900 * P, 99, P) is None  # chunk 0 holds the gap: not regular
    assert s.regular_run("gap", "imu", t0 + 5100 * P, 99, P) is not None  # chunk 1 is (sample 5000, after it)
    assert s.regular_run("jitter", "imu", t0 + 100 * P, 100, P) is not None  # chunk 0 is regular
    assert s.regular_run("jitter", "imu", t0 + 4200 * P, 100, P) is None  # chunk 1 is not
    assert s.regular_run("slow", "imu", t0, 100, P) is None
    assert s.regular_run("regular", "imu", t0 - P, 10, P) is None  # before the first sample


def test_a_grid_with_rounded_offsets_never_takes_runs(store):
    ws = mmloader.open(store).windows(sec=2.0, stride=1.0, modalities=["imu"], imu_hz=30.0)
    ws.store.regular_run = lambda *a, **k: pytest.fail("a 30-Hz grid is not k * step exactly")
    assert ws[0]["imu"].shape == (6, 60)


def _same_batch(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        x, y = a[key], b[key]
        if hasattr(x, "dtype"):
            assert x.dtype == y.dtype and x.shape == y.shape and x.numpy().tobytes() == y.numpy().tobytes(), key
        else:
            assert x == y, key


@pytest.mark.parametrize("order", ["index", "shuffled"])
def test_read_batch_is_collate_of_the_windows(store, order):
    from mmloader.windows.collate import collate

    ws = mmloader.open(store).windows(sec=2.0, stride=0.5, modalities=["imu"])
    idx = np.arange(len(ws)) if order == "index" else np.random.default_rng(0).permutation(len(ws))
    for start in range(0, len(ws), 37):  # batches over every recording: runs, gaps, jitter, 100 Hz, off-grid
        batch = [int(i) for i in idx[start:start + 37]]
        _same_batch(ws.read_batch(batch), collate([ws[i] for i in batch]))


def test_read_batch_with_text_and_the_loader_uses_it(sample_store, monkeypatch):
    from mmloader.windows.collate import collate

    ds = mmloader.open(sample_store())
    ws = ds.windows(sec=4.0, modalities=["imu", "text"], anchor="events")
    assert len(ws) >= 9
    batch = list(range(9))
    _same_batch(ws.read_batch(batch), collate([ws[i] for i in batch]))
    assert ds.windows(sec=2.0, modalities=["imu", "video"], frames=1, size=(16, 16)).read_batch([0]) is None
    calls = []
    real = type(ws).read_batch
    monkeypatch.setattr(type(ws), "read_batch", lambda self, i: calls.append(len(i)) or real(self, i))
    got = list(ws.loader(batch_size=4, shuffle=True, seed=1))
    assert calls and sum(calls) == len(ws)
    monkeypatch.setattr(type(ws), "read_batch", lambda self, i: None)  # the per-window path
    for a, b in zip(got, ws.loader(batch_size=4, shuffle=True, seed=1)):
        _same_batch(a, b)


def _without_periods(monkeypatch, tmp_path):
    """The same recordings written as stores were before ``t_period`` (the array left out)."""
    from mmloader.store.writer import StoreWriter

    real = StoreWriter._create_array

    def create(group, name, *a, **k):
        if name != "t_period":
            return real(group, name, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(StoreWriter, "_create_array", staticmethod(create))
        return mmloader.write_store(tmp_path / "old", _recordings())


def _decodes(store_obj) -> dict:
    counts: dict = {}
    real = store_obj._decode_chunk

    def counting(rel, name, layout, idx):
        counts[name] = counts.get(name, 0) + 1
        return real(rel, name, layout, idx)

    store_obj._decode_chunk = counting
    return counts


def test_chunk_periods_spare_decoding_regular_times(store, monkeypatch, tmp_path):
    """``t_period`` (per chunk: its exact interval, 0 irregular, -1 one sample) is what the chunk's times say; with
    it a regular chunk's times are made, not decoded, and every window is bit-identical to a store without it,
    which still reads (as stores written before)."""
    from mmloader.store.reader import _period

    new = mmloader.open(store).store
    for rid in ("regular", "gap", "jitter", "slow"):
        h = new._timeseries_handle(rid, "imu")
        t = new.read_timeseries(rid, "imu").t_ns
        rows = h[5]
        assert h[7].tolist() == [_period(t[c * rows:(c + 1) * rows]) for c in range(h[2])], rid
    assert new._timeseries_handle("jitter", "imu")[7].tolist()[1] == 0  # the irregular stretch is in chunk 1

    old_url = _without_periods(monkeypatch, tmp_path)
    old = mmloader.open(old_url).store
    assert old._timeseries_handle("regular", "imu")[7] is None and old.validate() == [] and new.validate() == []
    spec = dict(sec=2.0, stride=0.5, modalities=["imu"])
    ws_new, ws_old = mmloader.open(store).windows(**spec), mmloader.open(old_url).windows(**spec)
    seen_new, seen_old = _decodes(ws_new.store), _decodes(ws_old.store)
    assert len(ws_new) == len(ws_old) > 0
    for i in range(len(ws_new)):
        a, b = ws_new[i], ws_old[i]
        for key in ("imu", "imu_mask"):
            assert a[key].numpy().tobytes() == b[key].numpy().tobytes(), (i, key)
    batch_new = ws_new.read_batch(list(range(len(ws_new))))
    assert torch_equal(batch_new["imu"], ws_old.read_batch(list(range(len(ws_old))))["imu"])
    # times decoded only for the irregular chunks (jitter's chunk 1, gap's chunk 0); the store before: every chunk
    assert seen_old["t_ns"] == seen_old["data"] and 0 < seen_new["t_ns"] <= 3 < seen_new["data"]


def torch_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def test_regular_runs_agree_with_regular_run_window_by_window(store):
    """``Store.regular_runs`` (a batch's windows of one recording at once) settles a window only where
    ``regular_run`` finds the same rows; everything else is left to it (-1) or the whole span refused (None)."""
    s = mmloader.open(store).store
    t0, n = 2_000_000_000, 400
    settled = 0
    for rid in ("regular", "gap", "jitter", "slow", "offgrid"):
        for first, count, stride in ((0, 20, 200), (3900, 5, 37), (8000, 8, 75), (2800, 10, 20), (4100, 6, 150)):
            starts = t0 + (first + np.arange(count) * stride) * P
            got = s.regular_runs(rid, "imu", starts, n, P)
            for j, t in enumerate(starts):
                alone = s.regular_run(rid, "imu", int(t), n, P)
                if got is None or got[1][j] < 0:
                    continue
                rows, start = got[0], int(got[1][j])
                assert alone is not None, (rid, first, j)
                assert rows.dtype == np.float32 and rows.flags.c_contiguous
                assert rows[:, start:start + n].tobytes() == np.ascontiguousarray(alone.T).tobytes(), (rid, j)
                settled += 1
    assert settled >= 20  # the regular recording's spans are settled together
    whole = s.regular_runs("regular", "imu", t0 + np.array([*range(0, 8800, 200), 8700]) * P, n, P)
    assert whole is not None and (whole[1][:-1] >= 0).all()  # the last at 8600 ends on the stream's last sample
    assert whole[1][-1] == -1 and s.regular_run("regular", "imu", t0 + 8700 * P, n, P) is None  # runs past the end
    assert s.regular_runs("jitter", "imu", t0 + np.array([100, 4200]) * P, n, P) is None  # chunk 1 is irregular
    assert s.regular_runs("regular", "imu", np.array([t0 - P]), n, P) is None  # before the first sample
    assert s.regular_runs("regular", "imu", np.array([], dtype=np.int64), n, P) is None


def test_read_batch_reads_a_recordings_windows_together(store, monkeypatch):
    """A batch with several windows of one recording on its own clock reads them through one ``regular_runs``
    span; the batch is the same as the windows read one by one."""
    from mmloader.windows.collate import collate

    ws = mmloader.open(store).windows(sec=2.0, stride=0.5, modalities=["imu"])
    spans = []
    real = ws.store.regular_runs

    def counting(*a, **k):
        out = real(*a, **k)
        spans.append(None if out is None else int((out[1] >= 0).sum()))
        return out

    monkeypatch.setattr(ws.store, "regular_runs", counting)
    batch = list(range(0, 60))
    _same_batch(ws.read_batch(batch), collate([ws[i] for i in batch]))
    assert spans and max(s or 0 for s in spans) >= 40  # the regular recording's windows in one span
    _same_batch(ws.read_batch([-1, -2, 3]), collate([ws[len(ws) - 1], ws[len(ws) - 2], ws[3]]))
    with pytest.raises(IndexError, match=f"window {len(ws)} out of range"):
        ws.read_batch([0, len(ws)])


def test_far_apart_windows_of_a_recording_are_not_read_as_one_span(store, monkeypatch):
    """Only windows within a window's length of each other share a span: a shuffled batch over a long recording
    never reads (and transposes) the whole stretch between its windows."""
    from mmloader.windows.collate import collate

    ws = mmloader.open(store).windows(sec=2.0, stride=0.5, modalities=["imu"])
    regular = [i for i in range(len(ws)) if ws.index_fields(i)["recording_id"] == "regular"]
    near, far = regular[10:14], regular[30::12][:4]  # 0.5 s apart; 6 s apart
    calls = []
    real = ws.store.regular_runs

    def spy(rid, stream, t_starts, n, period):
        out = real(rid, stream, t_starts, n, period)
        calls.append((len(t_starts), None if out is None else out[0].shape[1]))
        return out

    monkeypatch.setattr(ws.store, "regular_runs", spy)
    batch = [far[0], *near, *far[1:]]
    _same_batch(ws.read_batch(batch), collate([ws[i] for i in batch]))
    assert calls == [(4, 3 * 100 + 400)]  # the 4 near windows, over their own 700 samples; the far ones alone
