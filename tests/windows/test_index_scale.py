"""The window index scales: building it costs Python work per recording, never per window; derived sets are views
on their parent's columns; a pickled set is ~11 B per IMU-only window; and the result is the documented drop rules
(checked against a plain per-window reference on gaps, missing streams, narrations, labels and splits)."""

from __future__ import annotations

import gc
import hashlib
import json
import pickle
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

import mmloader
from mmloader.windows import protocol
from mmloader.windows.dataset import WindowSet
from mmloader.windows.index import build_index
from mmloader.windows.spec import NS, WindowSpec

N_REC = 80
WORDS = ["walk", "sit", "b", "a", "Ωmega"]


def _ts(rng, rate: float, seconds: float, gaps: int) -> mmloader.TimeSeriesInput:
    t = np.arange(int(seconds * rate), dtype=np.int64) * int(NS / rate) + int(rng.integers(0, 2 * NS))
    for _ in range(gaps):  # a jump of 0.2-3 s: a gap in the store (more than 5 periods)
        t[int(rng.integers(1, len(t))):] += int(rng.integers(NS // 5, 3 * NS))
    return mmloader.TimeSeriesInput(t, np.zeros((len(t), 1), np.float32), ["x"], ["u"], rate_hz=rate)


def _recordings():
    rng = np.random.default_rng(7)
    for r in range(N_REC):
        ts = {"acc": _ts(rng, 2.0, rng.uniform(3, 20), 0)}
        if r % 7:  # every 7th recording lacks imu
            ts["imu"] = _ts(rng, 4.0, rng.uniform(1, 25), int(rng.integers(0, 3)))
        events = {}
        if r % 5:
            t = np.sort(rng.integers(0, 25 * NS, int(rng.integers(0, 8))))
            t[1::3] = t[0::3][:len(t[1::3])]  # ties: ordered by text
            events["narrations"] = [(int(x), int(x), str(rng.choice(WORDS))) for x in t]
        if r % 3:
            a = rng.integers(0, 25 * NS, int(rng.integers(0, 4)))
            events["activities"] = [(int(x), int(x + rng.integers(1, 8 * NS)), str(rng.choice(WORDS))) for x in a]
        yield mmloader.Recording(f"r{r:04d}", split=["train", "val", None][r % 3], timeseries=ts, events=events)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return mmloader.open(mmloader.write_store(tmp_path_factory.mktemp("scale") / "s", _recordings())).store


# -- the reference: the drop rules, one window at a time ----------------------------------------------------------
def _reference(store, spec: WindowSpec) -> tuple[dict, dict]:
    """Columns and report of the documented rules, computed window by window (no video)."""
    mods = [m for m in spec.modalities if m != "text"]
    text = "text" in spec.modalities or spec.anchor == "events"
    rows = {(r["recording_id"], r["stream"]): r for r in store.streams.to_pylist()}
    gaps: dict = {}
    for g in store.gaps.to_pylist():
        gaps.setdefault((g["recording_id"], g["stream"]), []).append((g["t_start_ns"], g["t_end_ns"]))
    ev: dict = {}
    for e in store.events("narrations").to_pylist():
        ev.setdefault(e["recording_id"], []).append((e["t_start_ns"], e["text"]))
    lab: dict = {}
    if spec.label_stream:
        for e in store.events(spec.label_stream).to_pylist():
            lab.setdefault(e["recording_id"], []).append((e["t_start_ns"], e["t_end_ns"], e["text"]))
    sec, grid = spec.sec_ns, spec.grid_offsets_ns()
    out = {"recording_id": [], "split": [], "t0_ns": [], "text": [], "label": []}
    dropped: dict = {}
    n_cand = 0
    for rid, split in zip(store.recordings["recording_id"].to_pylist(), store.recordings["split"].to_pylist()):
        have = [rows[(rid, m)] for m in mods if (rid, m) in rows] or [
            s for (r, _), s in rows.items() if r == rid and s["kind"] != "events"]
        start, end = max(s["t_start_ns"] for s in have), min(s["t_end_ns"] for s in have)
        events = sorted(ev.get(rid, []))
        if spec.anchor == "events" and end - start < sec:
            n_cand += len(events)
            dropped["recording_too_short"] = dropped.get("recording_too_short", 0) + len(events)
            continue
        if spec.anchor == "tile":
            cands = [(start + k * spec.stride_ns, None) for k in range((end - start - sec) // spec.stride_ns + 1)
                     ] if end - start >= sec else []
        else:
            cands = [(min(max(t - sec // 2, start), end - sec), x) for t, x in events]
        for t0, own in cands:
            n_cand += 1
            why, inside, best = None, [x for t, x in events if t0 <= t < t0 + sec], None
            for a, b, x in lab.get(rid, []):
                if min(t0 + sec, b) - max(t0, a) > (best[0] if best else 0):
                    best = (min(t0 + sec, b) - max(t0, a), x)
            for m in mods:
                if (rid, m) not in rows:
                    why = why or f"missing_{m}"
            for m in mods:
                s = rows.get((rid, m))
                if s is not None and (t0 + grid[0] < s["t_start_ns"] or t0 + grid[-1] > s["t_end_ns"]):
                    why = why or f"{m}_not_covered"
                masked = sum(max(0, min(t0 + sec, b) - max(t0, a)) for a, b in gaps.get((rid, m), []))
                if s is not None and masked > spec.max_masked_fraction * sec:
                    why = why or f"{m}_gap"
            if text and spec.anchor == "tile" and not inside:
                why = why or "no_text"
            if spec.label_stream and best is None:
                why = why or "no_label"
            if why:
                dropped[why] = dropped.get(why, 0) + 1
                continue
            for k, v in (("recording_id", rid), ("split", split), ("t0_ns", t0),
                         ("text", own if spec.anchor == "events" else inside), ("label", best and best[1])):
                out[k].append(v)
    report = {"candidates": n_cand, "kept": len(out["t0_ns"]), "dropped": dict(sorted(dropped.items())),
              "recordings": len(set(out["recording_id"]))}
    return out, report


SPECS = [
    dict(sec=2, stride=0.5, modalities=("imu",)),
    dict(sec=3, stride=0.7, modalities=("imu", "acc"), max_masked_fraction=0.0),
    dict(sec=1.5, stride=1, modalities=("imu", "text"), max_masked_fraction=0.6),
    dict(sec=4, modalities=("imu",), anchor="events"),
    dict(sec=9, modalities=("acc", "text"), anchor="events"),
    dict(sec=2, stride=0.5, modalities=("acc",), label_stream="activities"),
    dict(sec=2, stride=1.3, modalities=("text",)),
]


@pytest.mark.parametrize("kw", SPECS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_the_index_is_the_drop_rules_window_by_window(store, kw):
    spec = WindowSpec(imu_hz=4.0, **kw)
    index, report = build_index(store, spec)
    ref, ref_report = _reference(store, spec)
    assert report == ref_report and report["kept"] > 0 and len(report["dropped"]) > 0
    for name in ("recording_id", "split", "t0_ns") + (("text",) if "text" in index.column_names else ()) + (
            ("label",) if spec.label_stream else ()):
        assert index[name].to_pylist() == ref[name], name
    assert index["t1_ns"].to_pylist() == [t + spec.sec_ns for t in ref["t0_ns"]]


# -- cost: per recording, never per window ------------------------------------------------------------------------
def _python_calls(fn) -> int:
    """Python and C function calls made while running ``fn()`` (deterministic: an operation count, not a time)."""
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def test_building_costs_no_python_work_per_window(store):
    """20x the windows (a shorter stride) makes the same calls (give or take a reason counted); 4x the recordings
    at most 4x the calls."""
    ids = store.recordings["recording_id"].to_pylist()
    for mods in (("imu",), ("imu", "text"), ("acc",)):
        few = _python_calls(lambda: build_index(store, WindowSpec(sec=2, stride=1, modalities=mods, imu_hz=4.0)))
        many = _python_calls(lambda: build_index(store, WindowSpec(sec=2, stride=0.05, modalities=mods, imu_hz=4.0)))
        assert abs(many - few) < 20, mods
    quarter = _python_calls(lambda: build_index(store, WindowSpec(sec=2, stride=0.5), recording_ids=ids[:N_REC // 4]))
    whole = _python_calls(lambda: build_index(store, WindowSpec(sec=2, stride=0.5), recording_ids=ids))
    assert whole < 4 * quarter


def _held_blocks(ds, stride: float) -> tuple[int, WindowSet]:
    """Python memory blocks held by a window set and three sets derived from it, and the set."""
    gc.collect()
    blocks = sys.getallocatedblocks()
    ws = ds.windows(sec=2, stride=stride, modalities=["imu"], imu_hz=4.0)
    derived = [ws.split("train"), ws.recordings(["r0001", "r0002"]), ws.filter(np.arange(len(ws)) % 2 == 0)]
    gc.collect()
    held = sys.getallocatedblocks() - blocks
    del derived
    return held, ws


def test_a_window_set_holds_no_python_object_per_window(store):
    ds = mmloader.open(store.url)
    _held_blocks(ds, 1)  # warm: the store's tables, imports
    few, small = _held_blocks(ds, 1)
    many, ws = _held_blocks(ds, 0.01)
    assert len(ws) > 50 * len(small) and many - few < len(ws) / 100
    c = ws._columns
    own = sum(p.values.nbytes for p in c.cols.values() if p.kind != "shift")
    assert own <= 11 * len(ws)  # recording code (2 B) + split code (1 B) + t0 (8 B); t1 is t0 + sec
    assert np.shares_memory(c.t0.values, np.frombuffer(ws.index["t0_ns"].chunk(0).buffers()[1], np.int64))


def test_derived_sets_are_views_on_their_parents_columns(store):
    ws = mmloader.open(store.url).windows(sec=2, stride=0.5, modalities=["imu", "text"], imu_hz=4.0)
    for sub in (ws.split("train"), ws.recordings(["r0004", "r0001"]), ws.filter(np.arange(len(ws)) % 3 == 0),
                ws.split("val").filter(lambda row: row["t0_ns"] % 2 == 0)):
        c = sub._columns
        assert 0 < len(sub) < len(ws)
        for name, p in c.cols.items():
            assert p.values is ws._columns.cols[name].values, name  # the parent's arrays, not copies
            assert p.rows.itemsize == 4 and p.rows is c.t0.rows  # one selection of 4 B per window, shared
        assert np.shares_memory(c.t0.values, ws._columns.t0.values)


def test_derived_sets_select_what_the_index_says(store):
    ws = mmloader.open(store.url).windows(sec=2, stride=0.5, modalities=["imu", "text"], imu_hz=4.0,
                                          label_stream="activities")
    split, rid = ws.index["split"].to_pylist(), ws.index["recording_id"].to_pylist()
    mask = np.arange(len(ws)) % 3 != 1
    cases = [(ws.split("train"), [s == "train" for s in split]),
             (ws.recordings(["r0004", "r0001", "r0001"]), [r in ("r0004", "r0001") for r in rid]),
             (ws.filter(mask), mask), (ws.filter(mask).split("val"), mask & np.array([s == "val" for s in split])),
             (ws.split("train").recordings(["r0000"]), [False] * len(ws))]
    for sub, want in cases:
        want = np.asarray(want, dtype=bool)
        expected = ws.index.filter(pa.array(want))
        assert sub.index.equals(expected) and len(sub) == expected.num_rows
        back = pickle.loads(pickle.dumps(sub))
        assert back.index.equals(expected) and back.report() == sub.report()
        for i in range(0, len(sub), 7):
            j = int(np.flatnonzero(want)[i])
            assert sub.index_fields(i) == {**ws.index_fields(j), "index": i} == back.index_fields(i)


def test_a_pickled_imu_set_is_small_and_equal(store):
    ws = mmloader.open(store.url).windows(sec=2, stride=0.05, modalities=["imu"], imu_hz=4.0)
    blob = pickle.dumps(ws, protocol=pickle.HIGHEST_PROTOCOL)
    assert len(blob) < 40 * len(ws) and len(ws) > 10_000
    back = pickle.loads(blob)
    assert back.index.equals(ws.index) and back.fingerprint_components() == ws.fingerprint_components()
    train = ws.split("train")
    assert len(pickle.dumps(train, protocol=pickle.HIGHEST_PROTOCOL)) < 40 * len(train) + 10_000


def test_any_index_table_round_trips(store):
    """A hand-made index (t1 not t0 + sec, ragged frame lists, an extra column) is kept as it is."""
    spec = WindowSpec(sec=2, stride=1, imu_hz=4.0)
    index, _ = build_index(store, spec)
    n = index.num_rows
    custom = index.set_column(3, "t1_ns", pa.array(np.asarray(index["t0_ns"]) + np.arange(n), pa.int64()))
    custom = custom.append_column("video_idx", pa.array([[k] * (k % 3) for k in range(n)], pa.list_(pa.int32())))
    custom = custom.append_column("note", pa.array([f"w{k}" if k % 4 else None for k in range(n)]))
    ws = WindowSet(store, spec, custom)
    for s in (ws, pickle.loads(pickle.dumps(ws)), ws.filter(np.ones(n, bool))):
        assert s.index.equals(custom)
        assert int(s._columns.t1[5]) == custom["t1_ns"][5].as_py()
        frames = s._columns.video_idx["video"][5]
        assert frames.tolist() == [5, 5] and frames.dtype == np.int64


def test_writing_an_entry_leaves_the_parent_alone(store):
    ws = mmloader.open(store.url).windows(sec=2, stride=1, modalities=["imu"], imu_hz=4.0)
    sub = ws.filter(np.arange(len(ws)) < 4)
    before = ws._columns.t0[0]
    sub._columns.t0[0] = before + 1
    assert ws._columns.t0[0] == before and sub._columns.t0[0] == before + 1 and sub._columns.t0[1] == ws._columns.t0[1]


def test_the_index_digest_is_made_in_batches_and_unchanged(monkeypatch):
    t = pa.table({"s": ["x", None, "é\"q", ""] * 5, "l": [[], ["u", "v"], None, ["w"]] * 5, "t": list(range(20))})

    def whole(table):  # the digest's definition: one JSON document per non-numeric column
        h = hashlib.sha256(f"rows={table.num_rows}".encode())
        for name in table.column_names:
            col = table[name].combine_chunks()
            h.update(f"\0{name}:{col.type}:{col.null_count}\0".encode())
            if name == "t":
                h.update(col.to_numpy().tobytes())
            else:
                h.update(json.dumps(col.to_pylist(), separators=(",", ":"), default=str).encode())
        return h.hexdigest()

    for batch in (1, 3, 7, 1 << 16):
        monkeypatch.setattr(protocol, "DIGEST_BATCH", batch)
        assert protocol.index_digest(t) == whole(t) and protocol.index_digest(t.slice(0, 0)) == whole(t.slice(0, 0))


def test_index_fields_of_a_batch_are_collated_index_fields(store):
    """``index_fields_batch`` (what batched reads use) is ``collate`` of ``index_fields`` window by window: the same
    values, dtypes and key order, on derived sets, with negative positions, and through the fallback to Python's
    division for times of 2**53 ns and beyond."""
    from mmloader.windows.collate import batch_index_fields, collate
    from mmloader.windows.dataset import _seconds

    ws = mmloader.open(store.url).windows(sec=2, stride=0.5, modalities=["imu", "text"], imu_hz=4.0,
                                          label_stream="activities")
    rng = np.random.default_rng(0)
    for sub in (ws, ws.split("val").filter(np.arange(len(ws.split("val"))) % 2 == 0),
                ws.recordings(["r0041", "r0016"])):
        assert len(sub) > 0
        idx = [int(i) for i in rng.integers(-len(sub), len(sub), 40)]
        want = collate([sub.index_fields(i) for i in idx])
        got = batch_index_fields(sub, idx)
        assert list(got) == list(want) == ["recording_id", "t0", "t1", "index", "text", "label"]
        for key, value in want.items():
            if isinstance(value, torch.Tensor):
                assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
            else:
                assert got[key] == value, key
    big = np.array([2**53 + 1, 2**62 + 12345, -(2**60) - 7, 1_700_000_000_123_456_789], dtype=np.int64)
    assert _seconds(big).tolist() == [int(v) / 1_000_000_000 for v in big]
    small = np.array([0, 1, 999_999_999, 2**53 - 1, -5], dtype=np.int64)
    assert _seconds(small).tolist() == [int(v) / 1_000_000_000 for v in small]


def test_index_fields_of_a_batch_from_a_hand_made_index(store):
    """An index whose times are not int64 (uint64 here) and whose labels are int64: the batch's fields are still
    collate of the window-by-window fields (times as float64 seconds, labels a list of numpy ints), and
    ``read_batch`` reads it."""
    import pyarrow.compute as pc

    from mmloader.windows.collate import collate

    spec = WindowSpec(sec=2, stride=1, imu_hz=4.0)
    index, _ = build_index(store, spec)
    n = index.num_rows
    custom = index.set_column(index.schema.get_field_index("t0_ns"), "t0_ns", pc.cast(index["t0_ns"], pa.uint64()))
    custom = custom.append_column("label", pa.array(np.arange(n) % 5, pa.int64()))
    ws = WindowSet(store, spec, custom)
    idx = [0, n - 1, 3, -2, 5]
    want = collate([ws.index_fields(i) for i in idx])
    got = ws.index_fields_batch(idx)
    assert list(got) == list(want)
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
        else:
            assert got[key] == value and [type(v) for v in got[key]] == [type(v) for v in value], key
    batch = ws.read_batch(idx)
    assert torch.equal(batch["t0"], want["t0"]) and batch["label"] == want["label"]
    for b, i in enumerate(idx):
        assert torch.equal(batch["imu"][b], ws[i]["imu"])


def test_a_sample_never_shares_memory_with_the_chunk_cache(store):
    """One channel: the window's rows are contiguous either way round; changing a sample in place must not change
    what the next read of it (from the process's decoded-chunk cache) returns."""
    import warnings

    ws = mmloader.open(store.url).windows(sec=2, stride=1, modalities=["imu"], imu_hz=4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only array
        for i in (0, 3, len(ws) - 1):
            a = ws[i]["imu"]
            before = a.clone()
            a += 1000.0
            assert torch.equal(ws[i]["imu"], before), i
