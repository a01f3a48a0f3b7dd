"""``Windows``: what the window cache and the loader need of a window set, and helpers to fingerprint one.

A ``Windows`` is a map-style dataset of samples (flat dicts, see ``mmloader.windows.dataset``) that can also tell,
without reading a tensor, the non-tensor values of a sample (``index_fields``) and what decides its samples
(``fingerprint_components``). ``WindowSet`` implements it, and so do ``mmloader.cache.CachedWindows`` (a cached view
of any ``Windows``) and ``imu2clip_plugin.embed.EmbeddedWindows``. To be read by loader workers it must be picklable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# component keys the window cache adds itself; a set's own components must not use them
RESERVED_COMPONENTS = ("cache_version", "mmloader_version", "transforms", "shard_size")


@runtime_checkable
class Windows(Protocol):
    """A window set: ``len``, ``[i]``, ``index_fields(i)``, ``fingerprint_components()``.

    - ``self[i]`` (``-len <= i < len``): sample ``i``, a dict of tensors (any name, dtype, shape) and plain values.
    - ``index_fields(i)``: the sample's non-tensor values (``recording_id``, ``t0``, ``t1``, ``index``, and
      ``text`` / ``label`` when it carries them), equal and of the same type as in ``self[i]``, computed without
      reading any tensor. It may hold extra keys; a sample key that is neither a tensor nor in it cannot be cached.
    - ``fingerprint_components()``: JSON values that decide every sample (two sets with equal components yield
      identical samples); the keys in ``RESERVED_COMPONENTS`` are the cache's own.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> dict[str, Any]: ...

    def index_fields(self, i: int) -> dict[str, Any]: ...

    def fingerprint_components(self) -> dict[str, Any]: ...


class WrappedWindows:
    """What a set wrapping another one (``self.source``: a cached view, an embedded view) takes from it unchanged:
    its description (``spec``, ``index``, ``modalities``, ``store``, ``video_backend``, ``report()``) and its
    selections (``split``, ``recordings``, ``filter``), which are the wrapped set's own (raw windows: wrap them again
    to cache or embed the selection)."""

    source: Any

    @property
    def spec(self) -> Any:
        return self.source.spec

    @property
    def index(self) -> Any:
        return self.source.index

    @property
    def modalities(self) -> Any:
        return self.source.modalities

    @property
    def store(self) -> Any:
        return self.source.store

    @property
    def video_backend(self) -> Any:
        """The wrapped set's video backend (None for a set without one)."""
        return getattr(self.source, "video_backend", None)

    def report(self) -> dict[str, Any]:
        """The wrapped set's report (candidates, kept and dropped windows)."""
        return self.source.report()

    def split(self, name: str) -> Any:
        """The wrapped set's ``split(name)``."""
        return self.source.split(name)

    def recordings(self, ids: Any) -> Any:
        """The wrapped set's ``recordings(ids)``."""
        return self.source.recordings(ids)

    def filter(self, predicate: Any) -> Any:
        """The wrapped set's ``filter(predicate)``."""
        return self.source.filter(predicate)


def position(i: int, n: int) -> int:
    """``i`` as a position in ``[0, n)`` (negative counts from the end); IndexError outside ``[-n, n)``."""
    if not -n <= i < n:
        raise IndexError(f"window {i} out of range ({n} windows)")
    return int(i) % n


# -- fingerprint helpers -----------------------------------------------------------------------------
def sha256_json(obj: Any) -> str:
    """SHA-256 (hex) of the canonical JSON of ``obj`` (sorted keys, no spaces, ``str`` of anything else)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def index_digest(index: pa.Table) -> str:
    """SHA-256 of a window index's contents (column names, types, values, row order)."""
    h = hashlib.sha256(f"rows={index.num_rows}".encode())
    for name in index.column_names:
        col = index[name].combine_chunks()
        h.update(f"\0{name}:{col.type}:{col.null_count}\0".encode())
        numeric = pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
        if numeric and col.null_count == 0:
            h.update(col.to_numpy().tobytes())
        elif pa.types.is_list(col.type) and col.null_count == 0 and pa.types.is_integer(col.type.value_type):
            h.update(pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
            h.update(pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
        else:
            _update_json_list(h, col)
    return h.hexdigest()


DIGEST_BATCH = 1 << 16  # rows made Python values at a time by index_digest


def _update_json_list(h: Any, col: pa.Array) -> None:
    """``h.update`` with the bytes of ``json.dumps(col.to_pylist(), separators=(",", ":"), default=str)``, made
    ``DIGEST_BATCH`` rows at a time (bounded memory: no Python object per row of the whole column at once)."""
    h.update(b"[")
    sep = b""
    for a in range(0, len(col), DIGEST_BATCH):
        part = json.dumps(col.slice(a, DIGEST_BATCH).to_pylist(), separators=(",", ":"), default=str)[1:-1]
        h.update(sep + part.encode())
        sep = b","
    h.update(b"]")


def canonical_spec(spec: Any) -> dict[str, Any]:
    """``spec.to_dict()`` as JSON values, numbers of float fields as floats (``sec=1`` and ``sec=1.0`` cut the
    same windows, so they must give the same fingerprint)."""
    out = json.loads(json.dumps(spec.to_dict()))
    for f in dataclasses.fields(spec):
        v = out.get(f.name)
        if "float" in str(f.type) and isinstance(v, int) and not isinstance(v, bool):
            out[f.name] = float(v)
    return out
