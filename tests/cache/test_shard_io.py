"""A shard's arrays written and read without Zarr's event loop stay plain Zarr: Zarr reads what is written, and what
Zarr wrote (caches from before, other encodings) is still read."""

from __future__ import annotations

import json

import numpy as np
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
    assert (tmp_path / shard_rel(0) / "imu" / "c.3.0.0").is_file()  # "." chunk keys: no folder per row
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
    assert "emb" not in shard.raw and shard.raw["imu"][3] == "/"
    for name, a in arrays.items():
        for j in (0, 4):
            assert np.array_equal(read_row(place, shard, name, j), a[j]), (name, j)
