"""One shard: samples → (commit record, stacked arrays) → a small Zarr group, and back, checked by CRC-32.

A shard holds windows ``[start, stop)``: one Zarr array per tensor key (windows stacked, zero-padded where shapes
vary, one raw chunk holding every row: a shuffled read of window ``j`` is one ``pread`` of its row's bytes at
``j * row_bytes``; shards written before hold one chunk per row and are read as well) and ``COMMIT.json``: the
sample's keys in order (``tensor`` or ``index``, the latter rebuilt from ``Windows.index_fields``), and per tensor
key its array, dtype, per-window shapes and CRC-32s.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import zarr

try:  # zlib's CRC-32 vectorised (4-5x faster on a 24-KB row), the same values; zlib itself where it is missing
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover
    from zlib import crc32

from .._version import __version__
from ..fsutil import get_fs, is_local, join
from .files import OpenFiles
from .layout import CACHE_FORMAT, CACHE_VERSION, COMMIT, CacheError, Place, shard_rel

if TYPE_CHECKING:
    import torch

_ARRAY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class RawArray:
    """A tensor key's array stored raw (the little-endian ``bytes`` codec alone): read without Zarr.

    ``path``: the array's folder; ``dtype`` (little endian), ``row_shape`` (one window's), ``rows`` (windows in the
    shard), ``sep``: the chunk key separator; ``whole``: one chunk holds every row (row ``j`` at byte
    ``j * row_bytes``), else one chunk per row (caches written before)."""

    path: str
    dtype: np.dtype
    row_shape: tuple[int, ...]
    rows: int
    sep: str
    whole: bool
    row_bytes: int = field(init=False)  # bytes of one row
    file_bytes: int = field(init=False)  # the length of each chunk file
    _zeros: tuple[str, ...] = field(init=False, repr=False)
    _chunk: str = field(init=False, repr=False)  # the one chunk file, when ``whole``

    def __post_init__(self) -> None:
        row = math.prod(self.row_shape) * self.dtype.itemsize
        zeros = ("0",) * len(self.row_shape)
        for name, value in (("row_bytes", row), ("file_bytes", row * (self.rows if self.whole else 1)),
                            ("_zeros", zeros), ("_chunk", join(self.path, self.sep.join(["c", "0", *zeros])))):
            object.__setattr__(self, name, value)

    def locate(self, j: int) -> tuple[str, int]:
        """(chunk file, byte offset in it) of row ``j``."""
        if self.whole:
            return self._chunk, j * self.row_bytes
        return join(self.path, self.sep.join(["c", str(j), *self._zeros])), 0


@dataclass
class OpenShard:
    """An opened, committed shard: its commit record and, per tensor key whose chunks are stored raw (the ``bytes``
    codec alone, as this module writes them), a ``RawArray`` for reading a window's bytes directly; ``array(name)``
    opens a key's Zarr array (the other layouts, and deep checks) when first asked."""

    commit: dict[str, Any]
    raw: dict[str, RawArray]
    group_url: str
    group_options: dict[str, Any] | None
    # raw keys whose every row has the array's row shape (none padded): (dtype, row shape, the commit's dtype); a
    # batch reads straight from the shards whose entries for its keys are all equal
    batchable: dict[str, tuple[str, tuple[int, ...], str]] = field(default_factory=dict)
    # one number per distinct (batchable, commit keys): shards that may be read into one batch share it
    signature: int = -1
    _arrays: dict[str, Any] | None = None

    def array(self, name: str) -> Any:
        """The Zarr array of tensor key ``name``."""
        if self._arrays is None:
            group = zarr.open_group(self.group_url, mode="r", storage_options=self.group_options)
            self._arrays = {key: group[t["array"]] for key, t in self.commit["tensors"].items()}
        return self._arrays[name]


class InvalidShard(Exception):
    """A shard that must not be served; ``state`` is ``torn`` or ``corrupt``."""

    def __init__(self, state: str, why: str):
        super().__init__(why)
        self.state = state


# -- tensors <-> numpy ---------------------------------------------------------------------------------
def to_numpy(t: "torch.Tensor") -> np.ndarray:
    """A CPU tensor's data as a C-contiguous numpy array (dtypes numpy lacks, e.g. bfloat16, as same-size ints)."""
    import torch

    t = t.detach().cpu()
    try:
        return np.ascontiguousarray(t.numpy())
    except TypeError:
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        return np.ascontiguousarray(t.contiguous().view(ints[t.element_size()]).numpy())


def to_torch(a: np.ndarray, dtype: str) -> "torch.Tensor":
    """``a`` as a tensor of ``dtype`` (``"torch.float32"``...), reinterpreting the bytes where numpy lacked it."""
    import torch

    t = torch.from_numpy(a)
    want = getattr(torch, dtype.removeprefix("torch."))
    return t if t.dtype == want else t.view(want)


def clone(sample: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``sample`` whose tensors the caller may modify."""
    import torch

    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sample.items()}


# -- encoding ------------------------------------------------------------------------------------------
def _keys_of(sample: dict[str, Any]) -> list[list[str]]:
    import torch

    return [[name, "tensor" if isinstance(v, torch.Tensor) else "index"] for name, v in sample.items()]


def _check_keys(samples: list[dict[str, Any]], start: int,
                index_fields: Callable[[int], dict[str, Any]]) -> list[list[str]]:
    """The shard's ``[key, kind]`` list; CacheError if windows differ in keys or a non-tensor value is not the
    one ``index_fields`` rebuilds."""
    first = samples[0]
    keys = _keys_of(first)
    for x, s in enumerate(samples, start):
        if _keys_of(s) != keys:
            raise CacheError(f"window {x} has keys {list(s)}, window {start} has {list(first)}: cannot cache")
        fields = index_fields(x)
        for name, kind in keys:
            if kind == "index" and (name not in fields or fields[name] != s[name]):
                raise CacheError(f"sample key {name!r} is neither a tensor nor rebuilt from the index; "
                                 "the window cache cannot hold it")
    return keys


def _stack(name: str, tensors: list["torch.Tensor"], start: int) -> tuple[np.ndarray, dict[str, Any]]:
    """One key's windows stacked into one array (zero-padded if shapes vary), and its commit entry."""
    values = [to_numpy(t) for t in tensors]
    dtypes = {str(t.dtype) for t in tensors}
    if len(dtypes) > 1 or len({v.ndim for v in values}) > 1:
        raise CacheError(f"{name!r}: dtype or number of dimensions varies between windows "
                         f"{start}..{start + len(values) - 1}")
    shapes = [list(v.shape) for v in values]
    full = tuple(max(s[d] for s in shapes) for d in range(values[0].ndim))
    if all(tuple(s) == full for s in shapes):
        stacked = np.stack(values)
    else:
        stacked = np.zeros((len(values), *full), dtype=values[0].dtype)
        for row, v in enumerate(values):
            stacked[(row, *(slice(0, s) for s in v.shape))] = v
    return stacked, {"dtype": dtypes.pop(), "shapes": shapes, "crc32": [crc32(v) for v in values]}


def encode_shard(samples: list[dict[str, Any]], k: int, start: int, fingerprint: str,
                 index_fields: Callable[[int], dict[str, Any]]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Shard ``k`` (windows ``start, start+1...``): its commit record and its arrays (one per tensor key)."""
    keys = _check_keys(samples, start, index_fields)
    tensors: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for n, (name, kind) in enumerate(keys):
        if kind != "tensor":
            continue
        array = name if _ARRAY_NAME.fullmatch(name) else f"key{n}"
        arrays[array], entry = _stack(name, [s[name] for s in samples], start)
        tensors[name] = {"array": array, **entry}
    commit = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "fingerprint": fingerprint,
        "shard": k, "start": start, "stop": start + len(samples), "keys": keys, "tensors": tensors,
        "written_by": {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                       "mmloader": __version__},
    }
    return commit, arrays


def write_group(url: str, arrays: dict[str, np.ndarray], storage_options: dict[str, Any] | None) -> None:
    """A Zarr group at ``url`` with one uncompressed array per entry, all of it in one chunk.

    The metadata is Zarr's own (``_zarr_json``: made once per dtype and shape by Zarr in a scratch folder); the chunk
    file, the rows' little-endian bytes one after the other (``c.0.0.0``: ``.``-separated chunk keys), is written
    directly: Zarr's event loop costs ~30 ms per array. One file per array, not one per row: a shuffled epoch opens
    one file per window and key instead of paying a path lookup per row on every read of it."""
    fs, path = get_fs(url, **(storage_options or {}))
    files: dict[str, bytes] = {"zarr.json": _zarr_json(None, ())}
    for name, a in arrays.items():
        if 0 in a.shape or a.ndim == 0:  # nothing to write row by row: Zarr writes it
            group = zarr.open_group(url, mode="a", storage_options=storage_options)
            group.create_array(name, shape=a.shape, chunks=(1, *a.shape[1:]) if a.ndim else (), dtype=a.dtype,
                               compressors=None, fill_value=np.zeros((), a.dtype).item(),
                               config={"write_empty_chunks": True})[...] = a
            continue
        rows = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<") if a.dtype.itemsize > 1 else a.dtype)
        files[f"{name}/zarr.json"] = _zarr_json(a.dtype, a.shape)
        files[f"{name}/c" + ".0" * a.ndim] = rows.tobytes()
    if is_local(fs):
        made: set[str] = set()
        for rel, data in files.items():
            target = os.path.join(path, rel)
            folder = os.path.dirname(target)
            if folder not in made:
                os.makedirs(folder, exist_ok=True)
                made.add(folder)
            with open(target, "wb") as f:
                f.write(data)
    else:
        fs.pipe({join(path, rel): data for rel, data in files.items()})


_ZARR_JSON: dict[tuple[str, tuple[int, ...]] | None, bytes] = {}


def _zarr_json(dtype: np.dtype | None, shape: tuple[int, ...]) -> bytes:
    """The ``zarr.json`` Zarr writes for this module's array of ``dtype`` and ``shape`` (None: the group's)."""
    key = None if dtype is None else (np.dtype(dtype).str, tuple(shape))
    if key not in _ZARR_JSON:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mmloader-zarr-meta-") as tmp:
            group = zarr.open_group(tmp, mode="w")
            rel = "zarr.json"
            if dtype is not None:
                group.create_array("a", shape=shape, chunks=shape, dtype=dtype, compressors=None,
                                   fill_value=np.zeros((), dtype).item(), config={"write_empty_chunks": True},
                                   chunk_key_encoding={"name": "default", "separator": "."})
                rel = "a/zarr.json"
            with open(os.path.join(tmp, rel), "rb") as f:
                _ZARR_JSON[key] = f.read()
    return _ZARR_JSON[key]


# -- opening and reading -------------------------------------------------------------------------------
def read_commit(place: Place, k: int, expected: dict[str, Any]) -> dict[str, Any]:
    """Shard ``k``'s commit record, checked against ``expected`` (format, version, fingerprint, shard, start,
    stop). Raises FileNotFoundError (absent), ``InvalidShard("torn")`` (data without a commit) or
    ``InvalidShard("corrupt")``."""
    rel = shard_rel(k)
    try:
        raw = _cat(place, place.at(rel, COMMIT))
    except FileNotFoundError:
        if place.fs.exists(place.at(rel)):
            raise InvalidShard("torn", f"{place.where(rel)}: data without {COMMIT}") from None
        raise
    try:
        commit = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidShard("corrupt", f"{place.where(rel, COMMIT)}: not valid JSON") from None
    for key, want in expected.items():
        if commit.get(key) != want:
            raise InvalidShard("corrupt", f"{place.where(rel, COMMIT)}: {key} is {commit.get(key)!r}, expected {want!r}")
    return commit


@functools.lru_cache(maxsize=1024)  # shards of one cache share a few distinct zarr.json files
def _raw_layout(meta: bytes) -> tuple[np.dtype, tuple[int, ...], int, str, bool] | None:
    """(dtype, row shape, rows, chunk key separator, one chunk for every row) of an array ``zarr.json`` stored as
    this module writes it — little-endian ``bytes`` codec alone, default chunk keys (``.``, or ``/`` as caches
    written before), one chunk holding every row (or one per row, as caches written before), no empty dimension —
    else None (read through Zarr)."""
    try:
        m = json.loads(meta)
        codecs = m["codecs"]
        shape = tuple(int(v) for v in m["shape"])
        chunks = tuple(int(v) for v in m["chunk_grid"]["configuration"]["chunk_shape"])
        keys = m["chunk_key_encoding"]
        ok = (m.get("zarr_format") == 3 and m["chunk_grid"].get("name") == "regular" and len(codecs) == 1
              and codecs[0].get("name") == "bytes"
              and (codecs[0].get("configuration") or {}).get("endian", "little") == "little"
              and keys.get("name") == "default" and (keys.get("configuration") or {}).get("separator", "/") in ("/", ".")
              and chunks in (shape, (1, *shape[1:])) and len(shape) >= 1 and 0 not in shape
              and not m.get("storage_transformers"))
        dtype = np.dtype(m["data_type"]) if ok and m["data_type"] != "bool" else np.dtype(bool) if ok else None
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None
    if dtype is None:
        return None
    sep = (keys.get("configuration") or {}).get("separator", "/")
    return (dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype), shape[1:], shape[0], sep, chunks == shape


def _cat(place: Place, path: str) -> bytes:
    """A small file's bytes (a plain ``open`` on a local disk: fsspec's path handling costs more than the read)."""
    if place.local:
        with open(path, "rb") as f:
            return f.read()
    return place.fs.cat_file(path)


def _all_rows_full(shapes: list[list[int]] | None, raw: RawArray) -> bool:
    """Whether every row's recorded shape is the array's row shape (no row padded)."""
    return shapes is not None and len(shapes) == raw.rows and all(tuple(s) == raw.row_shape for s in shapes)


def open_shard(place: Place, k: int, expected: dict[str, Any]) -> OpenShard:
    """Shard ``k``, committed and opened (see ``read_commit`` for what it raises); chunks are not checked. Raw
    arrays are described from their ``zarr.json`` read directly (no Zarr group is opened: ~50 µs, not ~2 ms)."""
    commit = read_commit(place, k, expected)
    rel = shard_rel(k)
    raw = {}
    for name, t in commit["tensors"].items():
        try:
            meta = _cat(place, place.at(rel, t["array"], "zarr.json"))
        except FileNotFoundError:
            raise InvalidShard("torn", f"{place.where(rel, t['array'])}: missing") from None
        layout = _raw_layout(meta)
        if layout is not None:
            raw[name] = RawArray(place.at(rel, t["array"]), *layout)
    batchable = {name: (r.dtype.str, r.row_shape, commit["tensors"][name]["dtype"]) for name, r in raw.items()
                 if _all_rows_full(commit["tensors"][name].get("shapes"), r)}
    return OpenShard(commit, raw, place.zarr_url(rel), place.zarr_options(), batchable,
                     _signature(batchable, commit.get("keys")))


_SIGNATURES: dict[tuple, int] = {}


def _signature(batchable: dict[str, tuple], keys: list) -> int:
    """A number standing for ``(batchable, keys)`` in this process: equal numbers, equal values (compared once per
    distinct value, not per shard of every batch)."""
    key = (tuple(sorted(batchable.items())), json.dumps(keys))
    return _SIGNATURES.setdefault(key, len(_SIGNATURES))


def read_row(place: Place, shard: OpenShard, name: str, j: int) -> np.ndarray:
    """Row ``j`` of a tensor key: its bytes read straight into memory when stored raw (one small read, no event
    loop: a Zarr v3 chunk with only the ``bytes`` codec is its rows' little-endian C-order bytes), else through
    Zarr. A chunk file of the wrong length raises."""
    raw = shard.raw.get(name)
    if raw is None:
        return np.asarray(shard.array(name)[j])
    out = np.empty(raw.row_shape, dtype=raw.dtype)
    path, offset = raw.locate(j)
    if place.local:
        fd = os.open(path, os.O_RDONLY)
        try:
            _check_length(fd, path, raw)
            n = os.preadv(fd, [_bytes_of(out)], offset)
        finally:
            os.close(fd)
    else:
        # a row's byte range of the shard's chunk, or (caches written before) its whole one-row chunk
        if raw.whole:
            data = place.fs.cat_file(path, start=offset, end=offset + raw.row_bytes)
        else:
            data = place.fs.cat_file(path)
        n = len(data)
        if n == raw.row_bytes:
            _bytes_of(out)[:] = np.frombuffer(data, dtype=np.uint8)
    if n != raw.row_bytes:
        raise ValueError(f"{path}: row {j} is {n} bytes, expected {raw.row_bytes}")
    return out if raw.dtype.isnative else out.astype(raw.dtype.newbyteorder("="))


def _bytes_of(a: np.ndarray) -> np.ndarray:
    """A C-contiguous array's bytes as a flat uint8 view."""
    return a.reshape(-1).view(np.uint8)


def _check_length(fd: int, path: str, raw: RawArray) -> None:
    """ValueError unless the open chunk file ``fd`` is exactly as long as ``raw`` says."""
    size = os.fstat(fd).st_size
    if size != raw.file_bytes:
        raise ValueError(f"{path}: {size} bytes, expected {raw.file_bytes}")


def _read_rows(raw: RawArray, rows: list[tuple[int, int]], flat: np.ndarray, crcs: list[int],
               files: OpenFiles) -> bool:
    """Rows ``(b, j)`` of a local raw array into ``flat[b]`` (a batch's bytes, one row per window), each checked
    against ``crcs[j]``; False as soon as a file is missing or short or a row does not match its CRC. An array in
    one chunk is read through ``files`` (its descriptor kept open); one written a chunk per row opens each."""
    size, preadv, crc = raw.row_bytes, os.preadv, crc32
    try:
        if raw.whole:
            with files.lock:
                fd, kept = files.fd(raw.locate(0)[0])
                try:
                    for b, j in rows:
                        row = flat[b]
                        if preadv(fd, [row], j * size) != size or crc(row) != crcs[j]:
                            return False
                finally:
                    if not kept:
                        os.close(fd)
            return True
        for b, j in rows:  # one chunk file per row
            fd = os.open(raw.locate(j)[0], os.O_RDONLY)
            try:
                row = flat[b]
                if os.readv(fd, [row, bytearray(1)]) != size or crc(row) != crcs[j]:
                    return False  # short, longer (size + 1) or damaged
            finally:
                os.close(fd)
        return True
    except (OSError, IndexError):  # unreadable, or a commit with fewer CRCs than rows
        return False


def read_batch_rows(place: Place, rows: list[tuple[OpenShard, int]], keys: list[list[str]],
                    alloc: Callable[[tuple[int, ...], Any], np.ndarray] | None = None,
                    files: OpenFiles | None = None, damaged: list[OpenShard] | None = None) -> dict[str, Any] | None:
    """The tensor keys of windows ``rows`` (opened shard, row) stacked: ``{key: (B, *shape) tensor}``, each row read
    straight into the batch array (made by ``alloc(shape, dtype)`` when given) and checked against its CRC-32; the
    rows of one shard are read together (its chunk file opened once per key, or kept open in ``files``). None when
    this cannot serve them all exactly (a remote cache, shards of other keys, rows of other shapes or encodings, a
    missing, short or damaged chunk): the caller then reads window by window, which rebuilds what is damaged. A
    shard whose rows failed to read is appended to ``damaged``."""
    if not place.local:
        return None
    files = files if files is not None else OpenFiles(0)
    by_shard: dict[int, tuple[OpenShard, list[tuple[int, int]]]] = {}
    for b, (shard, j) in enumerate(rows):
        by_shard.setdefault(id(shard), (shard, []))[1].append((b, j))
    first = rows[0][0]
    sigs = first.batchable
    names = [name for name, kind in keys if kind == "tensor"]
    if first.commit.get("keys") != keys or any(name not in sigs for name in names) or \
            any(s.signature != first.signature for s, _ in by_shard.values()):
        return None
    out: dict[str, Any] = {}
    for name in names:
        raw = first.raw[name]
        dtype, shape = raw.dtype, raw.row_shape
        batch = (alloc if alloc is not None and dtype.isnative else np.empty)((len(rows), *shape), dtype)
        flat = batch.reshape(len(rows), -1).view(np.uint8)
        for shard, items in by_shard.values():
            if not _read_rows(shard.raw[name], items, flat, shard.commit["tensors"][name]["crc32"], files):
                if damaged is not None:
                    damaged.append(shard)
                return None
        native = batch if dtype.isnative else batch.astype(dtype.newbyteorder("="))
        out[name] = to_torch(native, sigs[name][2])
    return out


def decode_window(place: Place, shard: OpenShard, j: int,
                  index_fields: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Row ``j`` of an opened shard as a sample (non-tensor keys from ``index_fields()``, called at most once);
    raises ``InvalidShard("corrupt")`` on a checksum mismatch."""
    out: dict[str, Any] = {}
    fields = None
    for name, kind in shard.commit["keys"]:
        if kind == "tensor":
            t = shard.commit["tensors"][name]
            a = read_row(place, shard, name, j)
            shape = tuple(t["shapes"][j])
            if a.shape != shape:
                a = np.ascontiguousarray(a[tuple(slice(0, s) for s in shape)])
            if crc32(a) != t["crc32"][j]:
                raise InvalidShard("corrupt", f"{place.where(shard_rel(shard.commit['shard']))}: "
                                              f"checksum mismatch in {name!r}, row {j}")
            out[name] = to_torch(a, t["dtype"])
        else:
            fields = fields if fields is not None else index_fields()
            out[name] = fields[name]
    return out


def check_all_rows(shard: OpenShard) -> None:
    """Deep check: every window's every tensor against its CRC-32; raises ValueError on the first mismatch."""
    for name, t in shard.commit["tensors"].items():
        whole = np.asarray(shard.array(name)[...])
        if len(whole) != len(t["shapes"]):
            raise ValueError(f"{name!r} has {len(whole)} rows, the commit {len(t['shapes'])}")
        for j, shape in enumerate(t["shapes"]):
            a = np.ascontiguousarray(whole[(j, *(slice(0, s) for s in shape))])
            if crc32(a) != t["crc32"][j]:
                raise ValueError(f"checksum mismatch in {name!r}, row {j}")
