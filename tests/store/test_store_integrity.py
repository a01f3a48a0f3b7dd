"""Store integrity (format version 2), on real Zarr and Parquet files: checksummed chunks and files, missing
chunks, generation ids (a store replaced underneath an open reader), refusing concurrent writers, safe ids."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mmloader import Store, StoreFormatError, StoreWriter
from mmloader.cli import main
from mmloader.store.schema import table_schema
from mmloader.store import check_recording_id

ROWS = 64  # small chunks: 300 samples -> 5 chunks of t_ns and data


def _write(url: str, scale: float = 1.0, overwrite: bool = False, barrier=None) -> str:
    """A small store: one IMU series in 5 chunks, a video index, a labels events table."""
    t = np.arange(300, dtype=np.int64) * 5_000_000
    data = (np.stack([np.sin(t / 1e8), np.cos(t / 1e8)], axis=1) * scale).astype(np.float32)
    w = StoreWriter(url, dataset="toy", source_fingerprint="fp", overwrite=overwrite)
    try:
        rel = w.write_timeseries("r1", "imu", t, data, ["a", "b"], ["m/s^2", "m/s^2"], 200.0, chunk_rows=ROWS)
        idx = w.write_video_index("r1", "video", np.arange(20, dtype=np.int64) * 100_000_000, np.arange(20) % 10 == 0)
        w.write_table("recordings", pa.Table.from_pylist([
            {"recording_id": "r1", "dataset": "toy", "split": "train", "duration_ns": 2 * 10**9,
             "modalities": ["imu", "video", "labels"], "meta_json": None}]))
        common = {"index_uri": None, "rate_hz": None, "channels": None, "units": None, "width": None, "height": None,
                  "codec": None}
        w.write_table("streams", pa.Table.from_pylist([
            {**common, "recording_id": "r1", "stream": "imu", "kind": "timeseries", "uri": rel, "t_start_ns": 0,
             "t_end_ns": int(t[-1]), "n_samples": len(t), "rate_hz": 200.0, "channels": ["a", "b"],
             "units": ["m/s^2"] * 2},
            {**common, "recording_id": "r1", "stream": "video", "kind": "video", "uri": "/nowhere/r1.mp4",
             "index_uri": idx, "t_start_ns": 0, "t_end_ns": 1_900_000_000, "n_samples": 20, "rate_hz": 10.0},
            {**common, "recording_id": "r1", "stream": "labels", "kind": "events", "uri": "events/labels.parquet",
             "t_start_ns": 0, "t_end_ns": 10**9, "n_samples": 1}], schema=table_schema("streams")))
        w.write_table("gaps", pa.Table.from_pylist([], schema=table_schema("gaps")))
        w.write_events("labels", pa.Table.from_pylist([
            {"recording_id": "r1", "t_start_ns": 0, "t_end_ns": 10**9, "text": f"walking x{scale}", "text_raw": None,
             "kind": "label", "source": "toy", "uid": "l0"}]))
        if barrier is not None:
            barrier.wait(timeout=60)  # both writers have passed the "destination exists" check: race the publish
        w.commit()
    except BaseException:
        w.abort()
        raise
    return url


def _flip(path: Path, offset: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 if offset is None else offset] ^= 0x5A
    path.write_bytes(bytes(raw))


def _cli_validate(url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmloader.cli", "validate", url], capture_output=True, text=True)


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return Path(_write(str(tmp_path / "s")))


def test_untouched_store_validates_and_records_integrity(store_dir, capsys):
    s = Store(str(store_dir))
    assert s.validate() == []
    assert main(["validate", str(store_dir)]) == 0 and "OK" in capsys.readouterr().out
    man = json.loads((store_dir / "mmloader.json").read_text())
    uuid.UUID(man["generation"])  # a uuid4 per written store
    files = man["files"]
    assert all(isinstance(e["size"], int) for e in files.values())
    assert all("sha256" in e for rel, e in files.items() if rel.endswith((".parquet", ".json")))
    assert sum(1 for rel in files if "/data/c/" in rel) == 5  # every chunk listed (300 rows / 64)
    g = s.timeseries_group("r1", "imu")
    assert g.attrs["generation"] == man["generation"]
    codecs = [c.to_dict()["name"] for c in g["data"].metadata.codecs]
    assert codecs[-1] == "crc32c"  # zstd before it when it pays (tests/store/test_direct_chunks.py)
    assert [c.to_dict()["name"] for c in g["t_ns"].metadata.codecs][-2:] == ["zstd", "crc32c"]
    # windowed and whole reads agree
    t, x = s.timeseries_slice("r1", "imu", 0, 10**9)
    ts = s.read_timeseries("r1", "imu")
    np.testing.assert_array_equal(x, ts.data[: len(x)])


def test_all_fill_value_chunks_are_stored(tmp_path):
    """write_empty_chunks: a chunk of zeros is a file, so an absent chunk is never 'just fill values'."""
    url = str(tmp_path / "z")
    with StoreWriter(url, dataset="toy", source_fingerprint="fp") as w:
        w.write_timeseries("r", "imu", np.arange(10, dtype=np.int64), np.zeros((10, 1)), ["a"], ["u"], 1.0, chunk_rows=4)
        w.write_video_index("r", "video", np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))
        for kind in ("recordings", "streams", "gaps"):
            w.write_table(kind, pa.Table.from_pylist([], schema=table_schema(kind)))
    files = json.loads((tmp_path / "z" / "mmloader.json").read_text())["files"]
    assert sorted(r for r in files if "/data/c/" in r) == [f"timeseries/r/imu.zarr/data/c/{i}/0" for i in range(3)]
    assert Store(url).validate() == []


def test_flipped_byte_in_zarr_chunk(store_dir):
    chunk = store_dir / "timeseries/r1/imu.zarr/data/c/2/0"
    _flip(chunk)
    s = Store(str(store_dir))  # opening reads no chunk
    t0 = 2 * ROWS * 5_000_000
    with pytest.raises(StoreFormatError, match=r"imu.zarr/data/c/2/0: chunk \(2, 0\) of array 'data' is damaged \(crc32c"):
        s.timeseries_slice("r1", "imu", t0, t0 + 10_000_000)
    s.timeseries_slice("r1", "imu", 0, 10_000_000)  # other chunks still read
    with pytest.raises(StoreFormatError, match=r"imu.zarr/data/c/2/0: .*crc32c checksum mismatch"):
        s.read_timeseries("r1", "imu")
    problems = Store(str(store_dir)).validate()
    assert len(problems) == 1 and "imu.zarr/data/c/2/0" in problems[0]
    r = _cli_validate(str(store_dir))
    assert r.returncode == 1 and "imu.zarr/data/c/2/0" in r.stderr and "1 problem(s)" in r.stdout


def test_flipped_byte_in_video_index_and_t_coarse(store_dir):
    _flip(store_dir / "video/r1/video.zarr/pts_ns/c/0")
    with pytest.raises(StoreFormatError, match=r"video.zarr/pts_ns/c/0: chunk \(0,\) of array 'pts_ns' is damaged"):
        Store(str(store_dir)).video_index("r1", "video")
    _flip(store_dir / "timeseries/r1/imu.zarr/t_coarse/c/0")
    with pytest.raises(StoreFormatError, match=r"imu.zarr/t_coarse/c/0: .*damaged"):
        Store(str(store_dir)).timeseries_slice("r1", "imu", 0, 10)
    r = _cli_validate(str(store_dir))
    assert r.returncode == 1 and "pts_ns/c/0" in r.stderr and "t_coarse/c/0" in r.stderr


def test_flipped_byte_in_recordings_parquet(store_dir):
    _flip(store_dir / "recordings.parquet")
    with pytest.raises(StoreFormatError, match=r"recordings.parquet: (checksum mismatch|not a readable Parquet)"):
        Store(str(store_dir))
    r = _cli_validate(str(store_dir))
    assert r.returncode == 1 and "recordings.parquet" in r.stderr


@pytest.mark.parametrize("offset", [4, -40])  # in the data pages / in the footer
def test_flipped_byte_in_events_parquet(store_dir, offset):
    path = store_dir / "events/labels.parquet"
    _flip(path, offset % path.stat().st_size)
    s = Store(str(store_dir))
    with pytest.raises(StoreFormatError, match=r"events/labels.parquet: (checksum mismatch|not a readable Parquet)"):
        s.events("labels")
    assert any("events/labels.parquet" in p for p in s.validate())


def test_changed_report_is_refused(tmp_path):
    url = str(tmp_path / "s")
    with StoreWriter(url, dataset="toy", source_fingerprint="fp") as w:
        for kind in ("recordings", "streams", "gaps"):
            w.write_table(kind, pa.Table.from_pylist([], schema=table_schema(kind)))
        w.write_json("reports/prepare.json", {"totals": {"recordings": 1}})
    assert Store(url).report() == {"totals": {"recordings": 1}}
    (tmp_path / "s" / "reports" / "prepare.json").write_text('{"totals": {"recordings": 2}}')
    with pytest.raises(StoreFormatError, match=r"reports/prepare.json: checksum mismatch"):
        Store(url).report()
    assert any("reports/prepare.json" in p for p in Store(url).validate())


def test_changed_zarr_metadata_is_found_by_validate(store_dir):
    meta = store_dir / "timeseries/r1/imu.zarr/zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["rate_hz"] = 100.0
    meta.write_text(json.dumps(doc, indent=2))
    problems = Store(str(store_dir)).validate()
    assert len(problems) == 1 and "imu.zarr/zarr.json" in problems[0]


def test_deleted_chunk(store_dir):
    os.remove(store_dir / "timeseries/r1/imu.zarr/data/c/3/0")
    s = Store(str(store_dir))
    t0 = 3 * ROWS * 5_000_000
    with pytest.raises(StoreFormatError, match=r"imu.zarr/data/c/3/0: missing chunk \(3, 0\) of array 'data'"):
        s.timeseries_slice("r1", "imu", t0, t0 + 10_000_000)
    with pytest.raises(StoreFormatError, match=r"imu.zarr/data/c/3/0: missing chunk"):
        s.read_timeseries("r1", "imu")
    problems = s.validate()
    assert len(problems) == 1 and "imu.zarr/data/c/3/0: missing" in problems[0]
    r = _cli_validate(str(store_dir))
    assert r.returncode == 1 and "imu.zarr/data/c/3/0: missing" in r.stderr


def test_chunk_deleted_while_open(store_dir):
    """A handle opened (and cached) before the chunk went: its load still refuses fill values."""
    s = Store(str(store_dir))
    s.timeseries_slice("r1", "imu", 0, 10_000_000)
    os.remove(store_dir / "timeseries/r1/imu.zarr/data/c/4/0")  # (a regular chunk's t_ns is never read: t_period)
    t0 = 4 * ROWS * 5_000_000
    with pytest.raises(StoreFormatError, match=r"imu.zarr/data/c/4/0: missing chunk \(4, 0\) of array 'data'"):
        s.timeseries_slice("r1", "imu", t0, t0 + 10_000_000)


def test_deleted_video_index_chunk(store_dir):
    os.remove(store_dir / "video/r1/video.zarr/keyframe/c/0")
    with pytest.raises(StoreFormatError, match=r"video.zarr/keyframe/c/0: missing chunk"):
        Store(str(store_dir)).video_index("r1", "video")


def test_replaced_underneath_raises(store_dir):
    s = Store(str(store_dir))
    s.timeseries_slice("r1", "imu", 0, 10_000_000)  # handle and chunk 0 cached
    _write(str(store_dir), scale=2.0, overwrite=True)  # prepare --overwrite while the reader is open
    t0 = 3 * ROWS * 5_000_000
    with pytest.raises(StoreFormatError, match="was replaced since it was opened; reopen it"):
        s.timeseries_slice("r1", "imu", t0, t0 + 10_000_000)  # chunk through the cached handle
    with pytest.raises(StoreFormatError, match="was replaced since it was opened; reopen it"):
        s.read_timeseries("r1", "imu")
    with pytest.raises(StoreFormatError, match="was replaced since it was opened; reopen it"):
        s.video_index("r1", "video")
    with pytest.raises(StoreFormatError, match="was replaced since it was opened; reopen it"):
        pickle.loads(pickle.dumps(s))  # a worker reopening it would see the other version
    fresh = Store(str(store_dir))
    assert fresh.generation != s.generation and fresh.validate() == []
    np.testing.assert_allclose(fresh.read_timeseries("r1", "imu").data[:, 1][0], 2.0)


def test_replaced_underneath_on_memory_fs():
    """No directory identity on memory:// (nor s3://): the generation in each group's attrs tells."""
    url = f"memory://mmtest-{uuid.uuid4().hex}/store"
    _write(url)
    s = Store(url)
    _write(url, scale=2.0, overwrite=True)
    with pytest.raises(StoreFormatError, match=r"was replaced since it was opened; reopen it.*imu.zarr is of generation"):
        s.read_timeseries("r1", "imu")
    with pytest.raises(StoreFormatError, match=r"events/labels.parquet: checksum mismatch"):
        s.events("labels")  # the events table read later is checked against the manifest opened


def _race(url: str, barrier, results) -> None:
    try:
        _write(url, barrier=barrier)
        results.put("ok")
    except FileExistsError as e:
        results.put(f"FileExistsError: {e}")
    except BaseException as e:  # pragma: no cover - reported to the parent
        results.put(f"{type(e).__name__}: {e}")


def test_concurrent_writers_exactly_one_wins(tmp_path):
    url = str(tmp_path / "dst")
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(url, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes[1] == "ok" and outcomes[0].startswith("FileExistsError") and "already exists" in outcomes[0], outcomes
    assert os.listdir(tmp_path) == ["dst"]  # the loser left nothing behind
    assert Store(url).validate() == []


def test_concurrent_prepare_cli(ego4d_tree, tmp_path):
    """Two real `mmloader prepare` runs to one DST without --overwrite: exactly one succeeds."""
    dst = tmp_path / "out" / "store"
    cmd = [sys.executable, "-m", "mmloader.cli", "prepare", "ego4d", str(ego4d_tree), str(dst), "-q"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = [(p.wait(180), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in done)
    assert codes == [0, 1], done
    loser = next(err for rc, _, err in done if rc == 1)
    assert "already exists" in loser and "--overwrite" in loser
    assert os.listdir(dst.parent) == ["store"]
    assert Store(str(dst)).validate() == []


def test_overwrite_false_never_replaces_at_commit(tmp_path):
    """A store published after this writer started is not replaced by its commit."""
    url = str(tmp_path / "s")
    w = StoreWriter(url, dataset="toy", source_fingerprint="fp")
    _write(url)  # another writer publishes first
    gen = Store(url).generation
    w.write_timeseries("r", "imu", np.arange(3, dtype=np.int64), np.zeros((3, 1)), ["a"], ["u"], 1.0)
    for kind in ("recordings", "streams", "gaps"):
        w.write_table(kind, pa.Table.from_pylist([], schema=table_schema(kind)))
    with pytest.raises(FileExistsError, match="already exists"):
        w.commit()
    assert Store(url).generation == gen and os.listdir(tmp_path) == ["s"]


@pytest.mark.parametrize("bad", ["", ".", "..", ".hidden", "a/b", "a\\b", "a\x00b", "a\nb", "x" * 201, 7])
def test_unsafe_ids_are_refused(tmp_path, bad):
    with pytest.raises(StoreFormatError, match="where-it-came-from"):
        check_recording_id(bad, "where-it-came-from")
    w = StoreWriter(str(tmp_path / "s"), dataset="toy", source_fingerprint="fp")
    try:
        with pytest.raises(StoreFormatError, match="recording id"):
            w.write_timeseries(bad, "imu", np.arange(3, dtype=np.int64), np.zeros((3, 1)), ["a"], ["u"], 1.0)
        with pytest.raises(StoreFormatError, match="stream name"):
            w.write_video_index("r", bad, np.arange(3, dtype=np.int64), np.ones(3, dtype=bool))
        if isinstance(bad, str):
            with pytest.raises(StoreFormatError, match="events table name"):
                w.write_events(bad, pa.Table.from_pylist([], schema=table_schema("events")))
            with pytest.raises(StoreFormatError, match="recordings.parquet.*'recording_id'"):
                w.write_table("recordings", pa.Table.from_pylist([
                    {"recording_id": bad, "dataset": "toy", "split": None, "duration_ns": 1, "modalities": [],
                     "meta_json": None}], schema=table_schema("recordings")))
    finally:
        w.abort()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("good", ["r1", "vid-a", "0b1c2d3e-uuid", "a.b_c-d", "x" * 200, "ünïcode"])
def test_safe_ids_pass(good):
    assert check_recording_id(good, "x") == good


# -- chunks bound to their place, zarr.json checked on read ---------------------------------------------------
def _constant_chunks_store(url: str) -> str:
    """One series whose data chunks are each one constant (chunk i = i + 1): every chunk compresses to the same
    size, so two can be swapped without changing any size."""
    n = 4 * ROWS
    t = np.arange(n, dtype=np.int64) * 5_000_000
    data = np.repeat(np.arange(1, 5, dtype=np.float32), ROWS)[:, None].repeat(2, axis=1)
    with StoreWriter(url, dataset="toy", source_fingerprint="fp") as w:
        rel = w.write_timeseries("r1", "imu", t, data, ["a", "b"], ["u", "u"], 200.0, chunk_rows=ROWS)
        w.write_table("recordings", pa.Table.from_pylist([
            {"recording_id": "r1", "dataset": "toy", "split": "train", "duration_ns": int(t[-1]),
             "modalities": ["imu"], "meta_json": None}]))
        w.write_table("streams", pa.Table.from_pylist([
            {"recording_id": "r1", "stream": "imu", "kind": "timeseries", "uri": rel, "index_uri": None,
             "t_start_ns": 0, "t_end_ns": int(t[-1]), "n_samples": n, "rate_hz": 200.0, "channels": ["a", "b"],
             "units": ["u", "u"], "width": None, "height": None, "codec": None}], schema=table_schema("streams")))
        w.write_table("gaps", pa.Table.from_pylist([], schema=table_schema("gaps")))
    return url


def test_every_chunk_has_a_sha256_in_the_manifest(store_dir):
    files = json.loads((store_dir / "mmloader.json").read_text())["files"]
    chunks = [rel for rel in files if "/c/" in rel]
    assert len(chunks) >= 10 and all("sha256" in files[rel] for rel in files)
    import hashlib

    for rel in chunks + ["timeseries/r1/imu.zarr/zarr.json", "timeseries/r1/imu.zarr/data/zarr.json"]:
        assert files[rel]["sha256"] == hashlib.sha256((store_dir / rel).read_bytes()).hexdigest(), rel


def test_swapped_same_size_chunks_are_refused(tmp_path):
    """Two chunks of one size, swapped: both crc32c are intact, so only the manifest's sha256 tells."""
    url = _constant_chunks_store(str(tmp_path / "s"))
    a, b = (tmp_path / "s/timeseries/r1/imu.zarr/data/c" / f"{i}/0" for i in (1, 2))
    raw_a, raw_b = a.read_bytes(), b.read_bytes()
    assert len(raw_a) == len(raw_b) and raw_a != raw_b
    a.write_bytes(raw_b)
    b.write_bytes(raw_a)
    s = Store(url)
    t0 = ROWS * 5_000_000  # in chunk 1
    with pytest.raises(StoreFormatError, match=r"imu.zarr/data/c/1/0: chunk \(1, 0\) of array 'data' is damaged "
                                               r"\(sha256 differs from the manifest's, crc32c intact"):
        s.timeseries_slice("r1", "imu", t0, t0 + 10_000_000)
    np.testing.assert_array_equal(s.timeseries_slice("r1", "imu", 0, 10_000_000)[1][:, 0], 1.0)  # chunk 0 reads
    with pytest.raises(StoreFormatError, match=r"imu.zarr/data/c/1/0: .*sha256 differs"):
        s.read_timeseries("r1", "imu")
    problems = Store(url).validate()
    assert len(problems) == 2 and "data/c/1/0: checksum mismatch" in problems[0] and "data/c/2/0" in problems[1]
    r = _cli_validate(url)
    assert r.returncode == 1 and "data/c/1/0" in r.stderr and "data/c/2/0" in r.stderr and "2 problem(s)" in r.stdout


def test_edited_zarr_json_is_refused_on_read(store_dir):
    """zarr.json files are checked (sha256) when a group is opened: an edited shape or attr is never served."""
    meta = store_dir / "timeseries/r1/imu.zarr/data/zarr.json"
    original = meta.read_text()
    doc = json.loads(original)
    doc["shape"][0] -= 64  # a shorter array: would silently drop the last chunk
    meta.write_text(json.dumps(doc, indent=2))
    with pytest.raises(StoreFormatError, match=r"imu.zarr/data/zarr.json: checksum mismatch"):
        Store(str(store_dir)).read_timeseries("r1", "imu")
    with pytest.raises(StoreFormatError, match=r"imu.zarr/data/zarr.json: checksum mismatch"):
        Store(str(store_dir)).timeseries_slice("r1", "imu", 0, 10)
    meta.write_text(original)
    group = store_dir / "timeseries/r1/imu.zarr/zarr.json"
    doc = json.loads(group.read_text())
    doc["attributes"]["channels"] = ["b", "a"]
    group.write_text(json.dumps(doc, indent=2))
    with pytest.raises(StoreFormatError, match=r"imu.zarr/zarr.json: checksum mismatch"):
        Store(str(store_dir)).read_timeseries("r1", "imu")
    problems = Store(str(store_dir)).validate()
    assert len(problems) == 1 and "imu.zarr/zarr.json" in problems[0]


def test_stripped_crc32c_codec_is_refused_on_read(store_dir):
    """data/zarr.json rewritten without the crc32c codec, and chunks rewritten to match: refused at the
    zarr.json, before any chunk is read."""
    import zarr

    g = store_dir / "timeseries/r1/imu.zarr"
    doc = json.loads((g / "data/zarr.json").read_text())
    doc["codecs"] = [c for c in doc["codecs"] if c["name"] != "crc32c"]
    (g / "data/zarr.json").write_text(json.dumps(doc, indent=2))
    arr = zarr.open_array(str(g / "data"), mode="r+")
    arr[:] = np.full(arr.shape, 42.0, np.float32)
    with pytest.raises(StoreFormatError, match=r"imu.zarr/data/zarr.json: checksum mismatch"):
        Store(str(store_dir)).timeseries_slice("r1", "imu", 0, 10)
    with pytest.raises(StoreFormatError, match=r"imu.zarr/data/zarr.json"):
        Store(str(store_dir)).read_timeseries("r1", "imu")
    assert any("data/zarr.json" in p for p in Store(str(store_dir)).validate())


# -- what --overwrite may replace --------------------------------------------------------------------------
def test_overwrite_replaces_only_a_store_or_an_empty_folder(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("precious")
    with pytest.raises(FileExistsError, match=r"afile: already exists and is a file, not an mmloader store, so it "
                                              "will not be replaced"):
        _write(str(afile), overwrite=True)
    assert afile.read_text() == "precious"
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "thesis.tex").write_text("x")
    with pytest.raises(FileExistsError, match=r"userdir: already exists and is a folder without mmloader.json: not "
                                              "an mmloader store, so it will not be replaced"):
        _write(str(user), overwrite=True)
    assert (user / "thesis.tex").read_text() == "x"
    (tmp_path / "empty").mkdir()
    assert Store(_write(str(tmp_path / "empty"), overwrite=True)).validate() == []
    gen = Store(str(tmp_path / "empty")).generation
    assert Store(_write(str(tmp_path / "empty"), overwrite=True)).generation != gen  # a store: replaced
    assert sorted(os.listdir(tmp_path)) == ["afile", "empty", "userdir"]


def test_overwrite_on_memory_fs(tmp_path):
    """Non-local: an interrupted writer's folder (its .mmloader-writing marker) may be replaced; other files not."""
    url = f"memory://mmtest-{uuid.uuid4().hex}/store"
    w = StoreWriter(url, dataset="toy", source_fingerprint="fp")
    w.write_timeseries("r1", "imu", np.arange(3, dtype=np.int64), np.zeros((3, 1)), ["a"], ["u"], 1.0)
    # killed: no commit, no abort; the next prepare --overwrite replaces it
    _write(url, overwrite=True)
    assert Store(url).validate() == []
    import fsspec

    fs = fsspec.filesystem("memory")
    assert not fs.exists(url + "/.mmloader-writing")
    assert ".mmloader-writing" not in json.loads(fs.cat(url + "/mmloader.json"))["files"]
    other = f"memory://mmtest-{uuid.uuid4().hex}/notes"
    fs.pipe(other + "/thesis.tex", b"x")
    with pytest.raises(FileExistsError, match="not an mmloader store"):
        _write(other, overwrite=True)
    assert fs.cat(other + "/thesis.tex") == b"x"


def test_destination_may_not_be_or_contain_the_source(tmp_path):
    src = tmp_path / "data" / "ego4d"
    src.mkdir(parents=True)
    for dst in (tmp_path / "data", src):
        with pytest.raises(ValueError, match=r"the destination (contains|is) .*ego4d, which this store is written "
                                             "from"):
            StoreWriter(str(dst), dataset="toy", source_fingerprint="fp", overwrite=True, protect=[str(src)])
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "data")
    with pytest.raises(ValueError, match="contains"):
        StoreWriter(str(link), dataset="toy", source_fingerprint="fp", overwrite=True, protect=[str(src)])
    with pytest.raises(ValueError, match="contains"):
        StoreWriter("memory://b/data", dataset="toy", source_fingerprint="fp", protect=["memory://b/data/ego4d"])
    w = StoreWriter(str(src / "store"), dataset="toy", source_fingerprint="fp", protect=[str(src)])  # inside: fine
    w.abort()
    assert sorted(os.listdir(src)) == []


def test_prepare_overwrite_onto_a_store_holding_the_source(tmp_path):
    """`mmloader prepare ego4d STORE/ego4d STORE --overwrite`: STORE is a store, but replacing it would delete the
    source inside it: refused in one line, nothing removed."""
    from conftest import make_ego4d_tree

    store = Path(_write(str(tmp_path / "s")))
    src = make_ego4d_tree(store / "ego4d")
    r = subprocess.run([sys.executable, "-m", "mmloader.cli", "prepare", "ego4d", str(src), str(store), "--overwrite",
                        "-q"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "the destination contains" in r.stderr and str(src) in r.stderr
    assert (src / "v2" / "full_scale" / "vid-a.mp4").exists() and (store / "mmloader.json").exists()


def test_prepare_to_unreachable_s3_is_one_line(ego4d_tree, tmp_path):
    pytest.importorskip("s3fs")
    from mmloader.errors import StoreUnreachableError

    opts = {"key": "x", "secret": "y",
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"}}
    with pytest.raises(StoreUnreachableError, match=r"^s3://bkt/newstore: cannot reach the storage"):
        StoreWriter("s3://bkt/newstore", dataset="toy", source_fingerprint="fp", **opts)
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"}
    r = subprocess.run([sys.executable, "-m", "mmloader.cli", "prepare", "ego4d", str(ego4d_tree), "s3://bkt/newstore",
                        "-q"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and (r.stdout + r.stderr).strip().splitlines() == [r.stderr.strip()], r.stderr
    assert "s3://bkt/newstore: cannot reach the storage" in r.stderr


def test_prepare_under_a_file_is_one_line(ego4d_tree, tmp_path):
    (tmp_path / "afile").write_text("x")
    r = subprocess.run([sys.executable, "-m", "mmloader.cli", "prepare", "ego4d", str(ego4d_tree),
                        str(tmp_path / "afile" / "sub" / "store"), "-q"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "afile" in r.stderr, r.stderr


# -- partial folders of killed writers -----------------------------------------------------------------------
_HOLD_PARTIAL = """
import sys, time
import numpy as np
from mmloader import StoreWriter
w = StoreWriter(sys.argv[1], dataset="toy", source_fingerprint="fp")
w.write_timeseries("r1", "imu", np.arange(3, dtype=np.int64), np.zeros((3, 1)), ["a"], ["u"], 1.0)
print(w.work_path, flush=True)
time.sleep(120)
"""


def test_partial_folders_of_killed_writers_are_removed(tmp_path):
    import signal
    import socket

    dst = tmp_path / "s"

    def holder() -> tuple[subprocess.Popen, str]:
        p = subprocess.Popen([sys.executable, "-c", _HOLD_PARTIAL, str(dst)], stdout=subprocess.PIPE, text=True)
        return p, p.stdout.readline().strip()

    killed, killed_partial = holder()
    live, live_partial = holder()
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        assert os.path.isdir(killed_partial) and os.path.isdir(live_partial)
        assert os.path.basename(killed_partial).startswith(".s.partial-")
        assert f"-{killed.pid}@" in os.path.basename(killed_partial)
        other_host = tmp_path / f".s.partial-0123abcd-{killed.pid}@not-{socket.gethostname()}"
        other_host.mkdir()
        old_only_copy = tmp_path / f".s.old-0123abcd-{killed.pid}@{os.path.basename(killed_partial).split('@')[1]}"
        old_only_copy.mkdir()  # a killed overwrite between its renames: DST absent, so this is the store
        _write(str(dst))  # a new writer for the same DST
        left = sorted(os.listdir(tmp_path))
        assert os.path.basename(killed_partial) not in left  # dead owner on this host: removed
        assert os.path.basename(live_partial) in left  # live owner: never touched
        assert other_host.name in left and old_only_copy.name in left
        _write(str(dst), overwrite=True)  # DST exists now: the stale .old- folder goes too
        assert old_only_copy.name not in os.listdir(tmp_path)
    finally:
        live.kill()
        live.wait(30)
        killed.stdout.close()
        live.stdout.close()
    assert Store(str(dst)).validate() == []
