"""A shard's arrays written and read without Zarr's event loop stay plain Zarr: Zarr reads what is written, and what
Zarr wrote (caches from before, other encodings) is still read."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from mmloader.cache.layout import COMMIT, Place, shard_rel
from mmloader.cache.shard import open_shard, read_row, write_group


def _arrays(rng):
    return {"imu": rng.standard_normal((5, 6, 40)).astype(np.float32), "mask": rng.random((5, 40)) > 0.5,
            "t": rng.integers(0, 1 << 40, (5,)), "emb": rng.standard_normal((5, 8)).astype(np.float64),
            "empty": np.zeros((5, 0), np.float32)}


def _commit(place: Place, k: int, arrays: dict) -> None:
    tensors = {name: {"array": name} for name in arrays}
    place.fs.pipe_file(place.at(shard_rel(k), COMMIT), json.dumps({"shard": k, "tensors": tensors}).encode())


def test_written_directly_read_by_zarr_and_by_rows(tmp_path):
    rng = np.random.default_rng(0)
    arrays = _arrays(rng)
    place = Place.of(str(tmp_path))
    write_group(place.at(shard_rel(0)), arrays, None)
    _commit(place, 0, arrays)
    group = zarr.open_group(place.at(shard_rel(0)), mode="r")
    for name, a in arrays.items():
        assert np.array_equal(group[name][...], a), name  # any Zarr reader sees the same arrays
    # one chunk file per array holds every row ("." chunk keys)
    assert sorted(p.name for p in (tmp_path / shard_rel(0) / "imu").iterdir()) == ["c.0.0.0", "zarr.json"]
    shard = open_shard(place, 0, {"shard": 0})
    assert set(shard.raw) == {"imu", "mask", "t", "emb"} and shard._arrays is None  # no Zarr group opened
    for name, a in arrays.items():
        for j in range(5):
            assert np.array_equal(read_row(place, shard, name, j), a[j]), (name, j)


def test_shards_zarr_wrote_are_still_read(tmp_path):
    """Caches written before (``/`` chunk keys), and arrays with another encoding (compressed: through Zarr)."""
    rng = np.random.default_rng(1)
    arrays = _arrays(rng)
    place = Place.of(str(tmp_path))
    group = zarr.open_group(place.at(shard_rel(1)), mode="w")
    for name, a in arrays.items():
        compressed = name == "emb"
        group.create_array(name, shape=a.shape, chunks=(1, *a.shape[1:]), dtype=a.dtype,
                           compressors=zarr.codecs.ZstdCodec() if compressed else None,
                           fill_value=np.zeros((), a.dtype).item(), config={"write_empty_chunks": True})[...] = a
    _commit(place, 1, arrays)
    shard = open_shard(place, 1, {"shard": 1})
    assert "emb" not in shard.raw and shard.raw["imu"].sep == "/" and not shard.raw["imu"].whole
    for name, a in arrays.items():
        for j in (0, 4):
            assert np.array_equal(read_row(place, shard, name, j), a[j]), (name, j)


def _full_commit(place: Place, k: int, arrays: dict) -> None:
    import zlib

    tensors = {name: {"array": name, "dtype": f"torch.{a.dtype}", "shapes": [list(a.shape[1:])] * len(a),
                      "crc32": [zlib.crc32(np.ascontiguousarray(r)) for r in a]} for name, a in arrays.items()}
    keys = [[name, "tensor"] for name in arrays]
    place.fs.pipe_file(place.at(shard_rel(k), COMMIT), json.dumps({"shard": k, "keys": keys, "tensors": tensors}).encode())


def test_a_shuffled_batch_across_both_layouts_and_a_damaged_chunk(tmp_path):
    """``read_batch_rows`` over rows of a shard in one chunk per array and of one written a chunk per row (by Zarr):
    the rows as written; a chunk of another length or a flipped byte makes it give up (None), never serve."""
    from mmloader.cache.shard import read_batch_rows

    rng = np.random.default_rng(2)
    new = {"imu": rng.standard_normal((5, 6, 40)).astype(np.float32), "emb": rng.standard_normal((5, 8))}
    old = {"imu": rng.standard_normal((4, 6, 40)).astype(np.float32), "emb": rng.standard_normal((4, 8))}
    place = Place.of(str(tmp_path))
    write_group(place.at(shard_rel(0)), new, None)
    group = zarr.open_group(place.at(shard_rel(1)), mode="w")
    for name, a in old.items():
        group.create_array(name, shape=a.shape, chunks=(1, *a.shape[1:]), dtype=a.dtype, compressors=None,
                           fill_value=0.0, config={"write_empty_chunks": True})[...] = a
    _full_commit(place, 0, new)
    _full_commit(place, 1, old)
    shards = [open_shard(place, k, {"shard": k}) for k in (0, 1)]
    assert shards[0].raw["imu"].whole and not shards[1].raw["imu"].whole
    rows = [(shards[1], 3), (shards[0], 4), (shards[0], 0), (shards[1], 0), (shards[0], 4)]
    keys = shards[0].commit["keys"]
    got = read_batch_rows(place, rows, keys)
    for name in new:
        want = np.stack([(old if s is shards[1] else new)[name][j] for s, j in rows])
        assert np.array_equal(got[name].numpy(), want), name

    chunk = tmp_path / shard_rel(0) / "emb" / "c.0.0"
    good = chunk.read_bytes()
    chunk.write_bytes(good[:-8])  # truncated: row 4 is short
    assert read_batch_rows(place, rows, keys) is None
    bad = bytearray(good)
    bad[4 * 64 + 3] ^= 0x04  # row 4
    chunk.write_bytes(bytes(bad))
    assert read_batch_rows(place, rows, keys) is None
    assert read_batch_rows(place, [(shards[0], 1), (shards[1], 2)], keys) is not None  # other rows still read
    chunk.write_bytes(good + b"\0")
    with pytest.raises(ValueError, match="bytes, expected"):  # one row read alone: the file's length is checked
        read_row(place, shards[0], "emb", 0)


def test_the_row_checksum_is_zlibs_crc32():
    """Rows are checked with a vectorised CRC-32 (zlib-ng) where installed: its values must be zlib's, which every
    cache was written with."""
    import zlib

    import numpy as np

    from mmloader.cache.shard import crc32

    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 64, 4097, 24_000, 100_003):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        assert crc32(data) == zlib.crc32(data), n
        assert crc32(data.view(np.uint8).reshape(-1)) == zlib.crc32(data.tobytes())
