"""Windows: the index, its report, exact alignment of time series, frames by timestamp, events mode."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import mmloader
from mmloader import StoreWriter
from mmloader.store.schema import table_schema

NS = 1_000_000_000


@pytest.fixture(scope="module")
def sample_ds(sample_store):
    return mmloader.open(sample_store(videos=3, seconds=16, seed=5, defect_fraction=0.5))


def test_imu_video_windows_on_the_sample(sample_ds):
    ws = sample_ds.windows(sec=5, modalities=["imu", "video"], frames=4)
    assert len(ws) > 0
    s = ws[0]
    assert s["imu"].shape == (6, 1000) and s["imu"].dtype.is_floating_point and s["imu_mask"].shape == (1000,)
    assert s["video"].shape == (4, 3, 120, 160) and str(s["video"].dtype) == "torch.uint8"
    requested = ws.spec.frame_offsets_ns() / NS
    half_period = 0.5 / 30.0
    for i in range(len(ws)):
        s = ws[i]
        assert np.all(np.abs(s["video_t"].numpy() - requested) <= half_period + 1e-9)
        assert s["t1"] - s["t0"] == pytest.approx(5.0)


def test_report_accounts_for_every_candidate(sample_ds):
    ws = sample_ds.windows(sec=5, stride=2.5, modalities=["imu", "video"])
    r = ws.report()
    assert r["kept"] == len(ws)
    assert r["kept"] + sum(r["dropped"].values()) == r["candidates"]
    # candidates computed independently from the streams table
    expected = 0
    streams = sample_ds.streams.to_pylist()
    for rid in sample_ds.recording_ids:
        rows = [s for s in streams if s["recording_id"] == rid and s["stream"] in ("imu", "video")]
        start, end = max(s["t_start_ns"] for s in rows), min(s["t_end_ns"] for s in rows)
        expected += max(0, (end - start - 5 * NS) // (NS * 5 // 2) + 1)
    assert r["candidates"] == expected
    assert r["dropped"].get("missing_imu", 0) > 0  # the video without IMU is counted, not silently skipped


def test_events_windows_are_centred_on_narrations(sample_ds):
    ws = sample_ds.windows(sec=4, modalities=["imu"], anchor="events")
    narr = sample_ds.events("narrations").to_pylist()
    assert len(ws) > 0 and ws.report()["candidates"] == sum(
        1 for n in narr if n["kind"] == "narration")
    by_text = {}
    for n in narr:
        by_text.setdefault((n["recording_id"], n["text"]), []).append(n["t_start_ns"] / NS)
    for i in range(len(ws)):
        s = ws[i]
        assert isinstance(s["text"], str)
        centres = by_text[(s["recording_id"], s["text"])]
        mid = (s["t0"] + s["t1"]) / 2
        # centred, unless clamped into the recording
        assert any(abs(mid - c) < 1e-6 for c in centres) or s["t0"] <= 0.51 or s["t1"] >= 15.49


def test_tile_text_lists_the_narrations_inside(sample_ds):
    ws = sample_ds.windows(sec=5, modalities=["imu", "text"])
    for i in range(len(ws)):
        s = ws[i]
        assert isinstance(s["text"], list) and len(s["text"]) >= 1
    assert "no_text" in ws.report()["dropped"] or ws.report()["kept"] == ws.report()["candidates"]


def test_split_filter_and_unknown_modality(sample_ds):
    ws = sample_ds.windows(sec=5, modalities=["imu"])
    train = ws.split("train")
    assert set(train.index["split"].to_pylist()) <= {"train"}
    assert len(train) + sum(len(ws.split(s)) for s in ("val", "test")) == len(ws)
    first = ws.filter(lambda row: row["t0_ns"] == 0 or row["recording_id"] == ws.index["recording_id"][0].as_py())
    assert 0 < len(first) <= len(ws)
    with pytest.raises(ValueError, match=r"unknown modality 'gaze'.*has \["):
        sample_ds.windows(sec=5, modalities=["gaze"])
    with pytest.raises(ValueError, match="sec must be > 0"):
        sample_ds.windows(sec=0)


def test_selections_of_an_empty_set_are_empty(sample_ds):
    empty = sample_ds.windows(sec=5, modalities=["imu"]).filter(lambda row: False)
    assert len(empty) == 0
    assert len(empty.split("train")) == 0
    assert len(empty.filter([])) == 0


# -- exact alignment on analytic signals ------------------------------------------------------------

def _sig(t_ns):
    s = np.asarray(t_ns, dtype=np.float64) / NS
    return np.stack([np.sin(2 * np.pi * 1.3 * s), 0.5 * np.cos(2 * np.pi * 4.0 * s + 0.3),
                     2.0 * np.sin(2 * np.pi * 0.4 * s + 1.0)], axis=1)


@pytest.fixture(scope="module")
def analytic_store(tmp_path_factory):
    """One recording, 20 s from t=7 s (a clock not starting at 0): 'irr' at irregular ~200 Hz with a 0.6 s
    gap at 12 s, 'fast' at 800 Hz with a high-frequency (150 Hz) component that must be filtered out."""
    rng = np.random.default_rng(0)
    t_irr = (7 * NS + np.cumsum(rng.uniform(4.4e6, 5.6e6, 4200))).astype(np.int64)
    t_irr = t_irr[t_irr < 27 * NS]
    gap = (t_irr > 12 * NS) & (t_irr < 12.6 * NS)
    t_irr = t_irr[~gap]
    t_fast = (7 * NS + np.arange(16000) * 1_250_000).astype(np.int64)
    x_fast = _sig(t_fast) + 0.3 * np.sin(2 * np.pi * 150 * t_fast / NS)[:, None]
    url = str(tmp_path_factory.mktemp("a") / "store")
    g0 = int(t_irr[np.searchsorted(t_irr, 12 * NS) - 1])
    g1 = int(t_irr[np.searchsorted(t_irr, 12 * NS)])
    with StoreWriter(url, dataset="analytic", source_fingerprint="x") as w:
        rows = []
        for name, t, x, hz in (("irr", t_irr, _sig(t_irr), 200.0), ("fast", t_fast, x_fast, 800.0)):
            rel = w.write_timeseries("r", name, t, x.astype(np.float32), ["a", "b", "c"], ["u"] * 3, hz)
            rows.append({"recording_id": "r", "stream": name, "kind": "timeseries", "uri": rel,
                         "t_start_ns": int(t[0]), "t_end_ns": int(t[-1]), "n_samples": len(t), "rate_hz": hz,
                         "channels": ["a", "b", "c"], "units": ["u"] * 3})
        w.write_table("recordings", pa.Table.from_pylist([{"recording_id": "r", "dataset": "analytic", "split": "train",
                                                             "duration_ns": 20 * NS, "modalities": ["irr", "fast"],
                                                             "meta_json": None}]))
        w.write_table("streams", pa.Table.from_pylist([{f.name: r.get(f.name) for f in table_schema("streams")} for r in rows],
                                                      schema=table_schema("streams")))
        w.write_table("gaps", pa.Table.from_pylist([{"recording_id": "r", "stream": "irr", "t_start_ns": g0, "t_end_ns": g1}]))
    return mmloader.open(url), (g0, g1)


@pytest.mark.parametrize("stream", ["irr", "fast"])
def test_resampling_matches_analytic_signal(analytic_store, stream):
    ds, (g0, g1) = analytic_store
    ws = ds.windows(sec=2, stride=1, modalities=[stream], imu_hz=200, max_masked_fraction=0.5)
    assert len(ws) > 10
    amp = np.array([1.0, 0.5, 2.0])
    checked = 0
    for i in range(len(ws)):
        s = ws[i]
        grid = round(s["t0"] * NS) + np.round(np.arange(400) * 5e6).astype(np.int64)
        y, mask = s[stream].numpy().T, s[f"{stream}_mask"].numpy()
        far = (np.abs(grid - g0) > 50_000_000) & (np.abs(grid - g1) > 50_000_000) if stream == "irr" else np.ones(400, bool)
        err = np.abs(y - _sig(grid)) / amp
        assert err[mask & far].max() < 1e-3, (i, err[mask & far].max())
        assert np.all(y[~mask] == 0)
        if stream == "irr":
            inside_gap = (grid > g0) & (grid < g1)
            assert not mask[inside_gap].any()  # masked, never invented
        checked += int((mask & far).sum())
    assert checked > 10 * 400


def test_gappy_windows_are_dropped_with_a_reason(analytic_store):
    ds, _ = analytic_store
    strict = ds.windows(sec=1, stride=0.5, modalities=["irr"], max_masked_fraction=0.1)
    loose = ds.windows(sec=1, stride=0.5, modalities=["irr"], max_masked_fraction=1.0)
    assert strict.report()["dropped"]["irr_gap"] >= 1
    assert len(loose) == len(strict) + strict.report()["dropped"]["irr_gap"]


def test_label_stream_gives_the_covering_segment(sample_ds):
    ws = sample_ds.windows(sec=5, modalities=["imu"], label_stream="activities")
    acts = sample_ds.events("activities").to_pylist()
    assert len(ws) > 0
    for i in range(len(ws)):
        s = ws[i]
        t0, t1 = round(s["t0"] * NS), round(s["t1"] * NS)
        overlaps = {}
        for a in acts:
            if a["recording_id"] == s["recording_id"]:
                overlaps[a["text"]] = overlaps.get(a["text"], 0) + max(0, min(t1, a["t_end_ns"]) - max(t0, a["t_start_ns"]))
        assert overlaps[s["label"]] == max(overlaps.values()) > 0
    assert ws.report()["kept"] + sum(ws.report()["dropped"].values()) == ws.report()["candidates"]
    cached = ws.cache(progress=False)
    assert cached[0]["label"] == ws[0]["label"]


def test_index_columns_and_distinct_frames(sample_ds):
    """The index is built from numpy blocks: same Arrow types as before, one list of F frame indices per window,
    and F at the bound (a window's whole 30 fps share) selects F distinct frames."""
    ws = sample_ds.windows(sec=1, stride=0.5, modalities=["imu", "video"], frames=30)
    assert ws.index.schema.field("t0_ns").type == pa.int64() and ws.index.schema.field("t1_ns").type == pa.int64()
    assert ws.index.schema.field("video_idx").type == pa.list_(pa.int32())
    idx = ws.index["video_idx"].to_pylist()
    assert len(idx) == len(ws) > 0 and all(len(i) == 30 and len(set(i)) == 30 for i in idx)
    assert np.all(np.asarray(ws.index["t1_ns"]) - np.asarray(ws.index["t0_ns"]) == NS)
    empty = sample_ds.windows(sec=15.9, modalities=["imu", "video"], frames=2)
    assert empty.index.schema.equals(sample_ds.windows(sec=5, modalities=["imu", "video"], frames=2).index.schema)
