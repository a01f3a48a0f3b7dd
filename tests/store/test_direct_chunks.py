"""Direct chunk reads (``mmloader.store.chunks``): the same arrays as Zarr reads, every chunk, edges included; other
codec pipelines go through Zarr; the decoded-chunk cache is bounded in bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

import mmloader
from mmloader.lru import LRU
from mmloader.store import reader as reader_module
from mmloader.store.chunks import ArrayLayout, ChunkDecodeError, decode_chunk


def _store(tmp_path, rows=10_000, seed=0):
    rng = np.random.default_rng(seed)
    t = 1_000_000_000 + np.arange(rows, dtype=np.int64) * 5_000_000 + rng.integers(0, 1000, rows)
    x = rng.standard_normal((rows, 6)).astype(np.float32)
    rec = mmloader.Recording(id="r", timeseries={"imu": mmloader.TimeSeriesInput(t, x, list("abcdef"), ["u"] * 6)})
    return mmloader.write_store(tmp_path / "s", [rec]), t, x


def test_every_chunk_decodes_as_zarr_reads_it(tmp_path):
    url, t, x = _store(tmp_path)
    group = zarr.open_group(f"{url}/timeseries/r/imu.zarr", mode="r")
    for name, expected in (("t_ns", t), ("data", x)):
        raw_meta = open(f"{url}/timeseries/r/imu.zarr/{name}/zarr.json", "rb").read()
        layout = ArrayLayout.parse(raw_meta)
        assert layout is not None and layout.shape == expected.shape
        assert layout.zstd == (name == "t_ns")  # noise data: stored raw (zstd would not pay)
        assert layout.grid_shape[0] == -(-expected.shape[0] // layout.chunks[0]) >= 3  # an edge chunk too
        for idx in np.ndindex(*layout.grid_shape):
            raw = open(f"{url}/timeseries/r/imu.zarr/{name}/{layout.key(idx)}", "rb").read()
            got = decode_chunk(raw, layout, idx)
            assert np.array_equal(got, group[name][layout.region(idx)])
            edge = any(r.stop - r.start < c for r, c in zip(layout.region(idx), layout.chunks))
            assert got.flags.writeable == edge  # a whole chunk is a read-only view of its bytes, an edge a copy
    store = mmloader.open(url).store
    whole = store.read_timeseries("r", "imu")
    assert np.array_equal(whole.t_ns, t) and np.array_equal(whole.data, x)
    handle = store._timeseries_handle("r", "imu")
    assert isinstance(handle[3], ArrayLayout)  # read directly, not through Zarr
    a, b = int(t[2000]), int(t[9000])
    ts, xs = store.timeseries_slice("r", "imu", a, b)
    assert np.array_equal(ts, t[1999:9002]) and np.array_equal(xs, x[1999:9002])


def test_a_damaged_chunk_is_named():
    layout = ArrayLayout(shape=(10,), chunks=(4,), dtype=np.dtype("<i8"), zstd=False)
    body = np.arange(4, dtype="<i8").tobytes()
    import google_crc32c

    raw = body + int(google_crc32c.value(body)).to_bytes(4, "little")
    assert np.array_equal(decode_chunk(raw, layout, (2,)), [0, 1])  # the edge chunk: 2 of its 4 rows
    with pytest.raises(ChunkDecodeError, match="crc32c"):
        decode_chunk(raw[:-1] + bytes([raw[-1] ^ 1]), layout, (0,))
    short = body[:-8]
    with pytest.raises(ChunkDecodeError, match="bytes decoded"):
        decode_chunk(short + int(google_crc32c.value(short)).to_bytes(4, "little"), layout, (0,))


@pytest.mark.parametrize("change", [
    lambda m: m["codecs"].insert(1, {"name": "transpose", "configuration": {"order": [0]}}),
    lambda m: m["codecs"][1].update(name="gzip", configuration={"level": 1}),
    lambda m: m["chunk_key_encoding"].update(name="v2"),
    lambda m: m.update(data_type="complex64"),
    lambda m: m["codecs"][0]["configuration"].update(endian="big"),
])
def test_other_layouts_are_left_to_zarr(tmp_path, change):
    url, _, _ = _store(tmp_path, rows=100)
    meta = json.loads(open(f"{url}/timeseries/r/imu.zarr/data/zarr.json", "rb").read())
    assert ArrayLayout.parse(json.dumps(meta).encode()) is not None
    change(meta)
    assert ArrayLayout.parse(json.dumps(meta).encode()) is None


def test_chunk_cache_is_bounded_in_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLOADER_CHUNK_CACHE_MB", "0.5")
    url, t, x = _store(tmp_path, rows=40_000)
    store = mmloader.open(url).store
    for c in range(0, 40_000, 1000):
        store.timeseries_slice("r", "imu", int(t[c]), int(t[min(c + 999, 39_999)]))
    assert store._chunks.weight <= 0.5 * (1 << 20) + 4096 * 32 and len(store._chunks) >= 1
    monkeypatch.setenv("MMLOADER_CHUNK_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="MMLOADER_CHUNK_CACHE_MB"):
        reader_module.chunk_cache_mb()


def test_lru_weights():
    lru: LRU = LRU(100, weigh=len, max_weight=10)
    for k in "abc":
        lru.get(k, lambda: "xxxx")
    assert list(lru) == ["b", "c"] and lru.weight == 8
    lru.get("big", lambda: "y" * 50)  # heavier than the bound alone: kept, the others go
    assert list(lru) == ["big"] and lru.weight == 50
    lru.pop("big")
    assert lru.weight == 0
    with pytest.raises(ValueError):
        LRU(3, weigh=len)


def test_cached_chunks_cannot_be_changed_through_a_slice(tmp_path):
    url, t, x = _store(tmp_path, rows=1000)
    store = mmloader.open(url).store
    ts, xs = store.timeseries_slice("r", "imu", int(t[10]), int(t[20]))  # inside one chunk: views of the cache
    with pytest.raises(ValueError, match="read-only"):
        xs[0, 0] = 1.0
    again = store.timeseries_slice("r", "imu", int(t[10]), int(t[20]))[1]
    assert np.array_equal(again, x[9:22])


def test_data_zstd_does_not_shrink_is_stored_raw_and_still_checked(tmp_path):
    """A series whose first chunk zstd shrinks by under 10 % (sensor noise) is stored ``bytes -> crc32c`` and read
    without decompression; one that compresses (quantized steps) keeps zstd; both read back exactly, through Zarr
    too, validate, and a flipped byte in a raw chunk is refused, never served."""
    from mmloader.errors import StoreFormatError

    rng = np.random.default_rng(4)
    n = 9000
    t = 1_000_000_000 + np.arange(n, dtype=np.int64) * 5_000_000
    series = {"noise": rng.standard_normal((n, 6)).astype(np.float32),
              "steps": (rng.integers(-40, 40, (n, 6)) * 0.05).astype(np.float32)}
    recs = [mmloader.Recording(id=rid, timeseries={"imu": mmloader.TimeSeriesInput(t, x, list("abcdef"), ["u"] * 6)})
            for rid, x in series.items()]
    url = mmloader.write_store(tmp_path / "s", recs)
    store = mmloader.open(url).store
    for rid, x in series.items():
        folder = f"{url}/timeseries/{rid}/imu.zarr"
        raw_meta = open(f"{folder}/data/zarr.json", "rb").read()
        names = [c["name"] for c in json.loads(raw_meta)["codecs"]]
        compressed = rid == "steps"
        assert names == (["bytes", "zstd", "crc32c"] if compressed else ["bytes", "crc32c"]), rid
        assert ArrayLayout.parse(raw_meta).zstd == compressed
        assert np.array_equal(store.read_timeseries(rid, "imu").data, x)
        assert np.array_equal(zarr.open_group(folder, mode="r")["data"][...], x)
    assert store.validate() == []
    chunk = tmp_path / "s" / "timeseries" / "noise" / "imu.zarr" / "data" / "c" / "1" / "0"
    bad = bytearray(chunk.read_bytes())
    bad[1000] ^= 0x08
    chunk.write_bytes(bytes(bad))
    fresh = mmloader.open(url).store
    with pytest.raises(StoreFormatError, match="imu.zarr/data/c/1/0"):
        fresh.timeseries_slice("noise", "imu", int(t[5000]), int(t[5100]))
