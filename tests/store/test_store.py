"""The store: schema-checked writes and reads, atomic publish, local and memory:// URLs."""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmloader import Dataset, Store, StoreFormatError, StoreWriter
from mmloader.store.schema import FORMAT_VERSION, load_schema, table_schema


def _write_small_store(url: str, **kw) -> str:
    t = np.arange(0, 1_000_000_000, 5_000_000, dtype=np.int64)
    data = np.stack([np.sin(t / 1e8), np.cos(t / 1e8)], axis=1).astype(np.float32)
    with StoreWriter(url, dataset="toy", source_fingerprint="fp", **kw) as w:
        rel = w.write_timeseries("r1", "imu", t, data, channels=["a", "b"], units=["m/s^2", "m/s^2"], rate_hz=200.0)
        w.write_table("recordings", pa.Table.from_pylist([
            {"recording_id": "r1", "dataset": "toy", "split": "train", "duration_ns": 10**9, "modalities": ["imu", "labels"], "meta_json": None}]))
        w.write_table("streams", pa.Table.from_pylist([
            {"recording_id": "r1", "stream": "imu", "kind": "timeseries", "uri": rel, "index_uri": None, "t_start_ns": int(t[0]),
             "t_end_ns": int(t[-1]), "n_samples": len(t), "rate_hz": 200.0, "channels": ["a", "b"], "units": ["m/s^2"] * 2,
             "width": None, "height": None, "codec": None},
            {"recording_id": "r1", "stream": "labels", "kind": "events", "uri": "events/labels.parquet", "index_uri": None,
             "t_start_ns": 0, "t_end_ns": 10**9, "n_samples": 1, "rate_hz": None, "channels": None, "units": None,
             "width": None, "height": None, "codec": None}], schema=table_schema("streams")))
        w.write_table("gaps", pa.Table.from_pylist([], schema=table_schema("gaps")))
        w.write_events("labels", pa.Table.from_pylist([
            {"recording_id": "r1", "t_start_ns": 0, "t_end_ns": 10**9, "text": "walking", "text_raw": None, "kind": "label",
             "source": "toy", "uid": "l0", "confidence": 0.9}]))
    return url


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_roundtrip(tmp_path, scheme):
    url = str(tmp_path / "store") if scheme == "local" else f"memory://mmtest-{uuid.uuid4().hex}/store"
    _write_small_store(url)
    store = Store(url)
    assert store.dataset == "toy"
    assert store.recordings.schema.equals(table_schema("recordings"), check_metadata=False)
    ts = store.read_timeseries("r1", "imu")
    assert ts.t_ns.dtype == np.int64 and ts.data.dtype == np.float32 and ts.data.shape == (200, 2)
    np.testing.assert_allclose(ts.data[:, 0], np.sin(ts.t_ns / 1e8), rtol=1e-6, atol=1e-6)
    assert ts.channels == ("a", "b") and ts.rate_hz == 200.0
    ev = store.events("labels")
    assert ev["text"].to_pylist() == ["walking"] and ev["confidence"].to_pylist() == [0.9]  # extra column kept
    assert store.validate() == []
    assert Dataset(store).info()["recordings"] == 1


def test_timeseries_is_time_first_and_chunked(tmp_path):
    url = _write_small_store(str(tmp_path / "s"))
    g = Store(url).timeseries_group("r1", "imu")
    assert g["data"].shape == (200, 2) and g["data"].chunks[1] == 2  # (N, C): time first, channels whole


def test_refuses_other_format_version(tmp_path):
    url = _write_small_store(str(tmp_path / "s"))
    man = json.loads((tmp_path / "s" / "mmloader.json").read_text())
    man["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "s" / "mmloader.json").write_text(json.dumps(man))
    with pytest.raises(StoreFormatError, match=rf"mmloader.json.*format version {FORMAT_VERSION + 1}.*reads version {FORMAT_VERSION}"):
        Store(url)


def test_refuses_missing_table_file(tmp_path):
    url = _write_small_store(str(tmp_path / "s"))
    os.remove(tmp_path / "s" / "streams.parquet")
    with pytest.raises(StoreFormatError, match=r"streams.parquet: missing"):
        Store(url)


def test_refuses_wrong_column_type(tmp_path):
    url = _write_small_store(str(tmp_path / "s"))
    path = tmp_path / "s" / "recordings.parquet"
    t = pq.read_table(path)
    t = t.set_column(t.schema.get_field_index("duration_ns"), "duration_ns", t["duration_ns"].cast(pa.float64()))
    pq.write_table(t, path)
    with pytest.raises(StoreFormatError, match=r"recordings.parquet: checksum mismatch"):
        Store(url)
    _rerecord(tmp_path / "s", "recordings.parquet")  # a checksum that agrees: now the schema check speaks
    with pytest.raises(StoreFormatError, match=r"recordings.parquet: column 'duration_ns' has type double, expected int64"):
        Store(url)


def _rerecord(root, rel):
    """Record a file's current size and sha256 in the manifest (as if the writer had written it)."""
    import hashlib

    man = json.loads((root / "mmloader.json").read_text())
    raw = (root / rel).read_bytes()
    man["files"][rel] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (root / "mmloader.json").write_text(json.dumps(man))


def test_refuses_missing_manifest_field(tmp_path):
    url = _write_small_store(str(tmp_path / "s"))
    man = json.loads((tmp_path / "s" / "mmloader.json").read_text())
    del man["tables"]
    (tmp_path / "s" / "mmloader.json").write_text(json.dumps(man))
    with pytest.raises(StoreFormatError, match=r"mmloader.json: missing field 'tables'"):
        Store(url)


def test_validate_finds_damaged_chunk(tmp_path):
    url = _write_small_store(str(tmp_path / "s"))
    chunk = next(p for p in (tmp_path / "s").rglob("*") if p.is_file() and "/data/c/" in str(p))
    chunk.write_bytes(chunk.read_bytes()[:-3])
    problems = Store(url).validate()
    assert len(problems) == 1 and str(chunk.relative_to(tmp_path / "s")) in problems[0] and "expected" in problems[0]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with StoreWriter(str(tmp_path / "s"), dataset="toy", source_fingerprint="fp") as w:
            w.write_timeseries("r1", "imu", np.arange(3, dtype=np.int64), np.zeros((3, 1)), ["a"], ["u"], 1.0)
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_interrupted_write_is_refused_on_open(tmp_path):
    """A writer killed before commit (no cleanup) leaves only a hidden partial folder, never a store."""
    w = StoreWriter(str(tmp_path / "s"), dataset="toy", source_fingerprint="fp")
    w.write_timeseries("r1", "imu", np.arange(3, dtype=np.int64), np.zeros((3, 1)), ["a"], ["u"], 1.0)
    # simulate a kill: no commit, no abort
    assert not (tmp_path / "s").exists()
    with pytest.raises(StoreFormatError, match="no such store"):
        Store(str(tmp_path / "s"))
    partial = [p for p in os.listdir(tmp_path) if p.startswith(".s.partial-")]
    assert partial
    with pytest.raises(StoreFormatError, match=r"mmloader.json: missing.*interrupted"):
        Store(str(tmp_path / partial[0]))


def test_interrupted_write_on_memory_fs_is_refused(tmp_path):
    url = f"memory://mmtest-{uuid.uuid4().hex}/store"
    w = StoreWriter(url, dataset="toy", source_fingerprint="fp")
    w.write_timeseries("r1", "imu", np.arange(3, dtype=np.int64), np.zeros((3, 1)), ["a"], ["u"], 1.0)
    with pytest.raises(StoreFormatError, match=r"mmloader.json: missing.*interrupted"):
        Store(url)


def test_commit_requires_core_tables(tmp_path):
    w = StoreWriter(str(tmp_path / "s"), dataset="toy", source_fingerprint="fp")
    with pytest.raises(StoreFormatError, match="without the tables"):
        w.commit()
    assert os.listdir(tmp_path) == []


def test_writer_rejects_bad_arrays(tmp_path):
    w = StoreWriter(str(tmp_path / "s"), dataset="toy", source_fingerprint="fp")
    with pytest.raises(StoreFormatError, match="strictly increasing"):
        w.write_timeseries("r", "imu", np.array([0, 2, 1], dtype=np.int64), np.zeros((3, 1)), ["a"], ["u"], 1.0)
    with pytest.raises(StoreFormatError, match="NaN"):
        w.write_timeseries("r", "imu", np.array([0, 1], dtype=np.int64), np.array([[np.nan], [0]]), ["a"], ["u"], 1.0)
    with pytest.raises(StoreFormatError, match="recordings.parquet.*missing column 'dataset'"):
        w.write_table("recordings", pa.table({"recording_id": ["r"]}))
    w.abort()


def test_existing_store_needs_overwrite(tmp_path):
    url = _write_small_store(str(tmp_path / "s"))
    with pytest.raises(FileExistsError, match="overwrite"):
        StoreWriter(url, dataset="toy", source_fingerprint="fp")
    _write_small_store(url, overwrite=True)
    assert Store(url).validate() == []
    assert sorted(os.listdir(tmp_path)) == ["s"]


def test_schema_is_the_single_source():
    doc = load_schema()
    assert doc["format_version"] == FORMAT_VERSION
    names = [c["name"] for c in doc["tables"]["streams"]["columns"]]
    assert table_schema("streams").names == names
