"""Reading the store's own Zarr v3 arrays without Zarr's async machinery.

Zarr-python 3 runs every read through an event loop in another thread: ~1–4 ms per group open or chunk read,
whatever the chunk's size. The arrays this library writes use one codec pipeline — ``bytes`` (little endian), then
``zstd``, then ``crc32c`` — on a regular chunk grid with default ``/`` chunk keys. ``ArrayLayout.parse`` recognises
exactly that (anything else returns None and is read through Zarr as before), and ``decode_chunk`` decodes one chunk
in ~the time zstd takes. The checks are the same as Zarr's read path plus the store's: the caller verifies the file's
sha256 against the manifest, ``decode_chunk`` the crc32c.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

_DTYPES = {"int64": "<i8", "int32": "<i4", "uint8": "u1", "bool": "?", "float32": "<f4", "float64": "<f8",
           "int16": "<i2", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8", "int8": "i1"}


class ChunkDecodeError(ValueError):
    """A chunk's bytes do not decode: ``detail`` says why (crc32c mismatch, zstd error, wrong size)."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class ArrayLayout:
    """Shape, chunk shape, dtype and codecs of one array, from its ``zarr.json``."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    zstd: bool

    @classmethod
    @functools.lru_cache(maxsize=1024)  # the arrays of a store's recordings share a few distinct zarr.json
    def parse(cls, raw: bytes) -> "ArrayLayout | None":
        """The layout of an array ``zarr.json``, or None when it is not one this module decodes (memoized)."""
        try:
            meta = json.loads(raw)
            if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
                return None
            grid, keys = meta["chunk_grid"], meta["chunk_key_encoding"]
            if grid.get("name") != "regular" or keys.get("name") != "default" or \
                    (keys.get("configuration") or {}).get("separator", "/") != "/":
                return None
            if meta.get("storage_transformers") or meta["data_type"] not in _DTYPES:
                return None
            names = [c.get("name") for c in meta["codecs"]]
            first = meta["codecs"][0]
            if first.get("name") != "bytes" or (first.get("configuration") or {}).get("endian", "little") != "little":
                return None
            if names not in (["bytes", "zstd", "crc32c"], ["bytes", "crc32c"]):
                return None
            return cls(shape=tuple(int(s) for s in meta["shape"]),
                       chunks=tuple(int(c) for c in grid["configuration"]["chunk_shape"]),
                       dtype=np.dtype(_DTYPES[meta["data_type"]]), zstd=names[1] == "zstd")
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return None

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Chunks along each dimension."""
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunks))

    def key(self, idx: tuple[int, ...]) -> str:
        """The chunk's path relative to the array: ``c/i/j``."""
        return "c/" + "/".join(str(i) for i in idx)

    def region(self, idx: tuple[int, ...]) -> tuple[slice, ...]:
        """The part of the array chunk ``idx`` holds."""
        return tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, self.chunks, self.shape))


def _crc32c(data: bytes) -> bytes:
    import google_crc32c

    return int(google_crc32c.value(data)).to_bytes(4, "little")


def _zstd() -> Any:
    from numcodecs import Zstd

    return Zstd()


_CODEC: list[Any] = []


def decode_chunk(raw: bytes, layout: ArrayLayout, idx: tuple[int, ...]) -> np.ndarray:
    """Chunk ``idx`` of an array from its file's bytes: crc32c checked, decompressed, cut to the array's edge
    (read-only unless cut). Raises ChunkDecodeError (with the reason) when the bytes do not decode to a whole
    chunk."""
    body = raw[:-4]  # one copy, checked and then decoded (or, uncompressed, viewed)
    if len(raw) < 4 or _crc32c(body) != raw[-4:]:
        raise ChunkDecodeError("crc32c checksum mismatch")
    if layout.zstd:
        if not _CODEC:
            _CODEC.append(_zstd())
        try:
            body = _CODEC[0].decode(body)
        except Exception as e:  # numcodecs raises RuntimeError on a bad frame
            raise ChunkDecodeError(f"zstd: {e}") from None
    n = int(np.prod(layout.chunks))
    if len(body) != n * layout.dtype.itemsize:
        raise ChunkDecodeError(f"{len(body)} bytes decoded, a chunk of {layout.chunks} {layout.dtype} is "
                               f"{n * layout.dtype.itemsize}")
    full = np.frombuffer(body, dtype=layout.dtype).reshape(layout.chunks)
    region = layout.region(idx)
    cut = tuple(slice(0, r.stop - r.start) for r in region)
    if all(r.stop - r.start == c for r, c in zip(region, layout.chunks)):
        return full  # read-only: a view of the decoded bytes, no copy
    return full[cut].copy()  # an edge chunk: not a view holding the whole chunk's bytes


def chunk_periods(t_ns: np.ndarray, rows: int) -> np.ndarray:
    """Per chunk of ``rows`` times: the exact interval (ns) between its samples when they are all equal, 0 when
    they differ, -1 for a chunk of one sample (``t_period``: a regular chunk's times are ``t_coarse[c] + k *
    t_period[c]``, so reading it needs no decode of ``t_ns``)."""
    out = np.empty(-(-len(t_ns) // rows), dtype=np.int64)
    for c in range(len(out)):
        t = t_ns[c * rows:(c + 1) * rows]
        if len(t) < 2:
            out[c] = -1
            continue
        d = np.diff(t)
        out[c] = int(d[0]) if (d == d[0]).all() else 0
    return out
