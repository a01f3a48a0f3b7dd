"""Shuffled batches read by all loader workers at once, each worker reading only its own share of the storage.

A full permutation scatters every batch over the whole dataset. Dealt whole to one worker at a time, every worker
then opens, decodes and caches every recording: with W workers, W times the cold reads and W copies of the
decoded-chunk cache. A set that says where a window's data lies — ``affinity(indices)``: an int per window, equal
for windows that read the same files (its recording; a window cache's shard) — has each batch *split* instead:
worker ``key % W`` reads the windows of its keys (``split``). The parts' big arrays (every tensor of two or more
dimensions: ``(B, C, T)`` samples, masks, embeddings) are written by the workers straight into one shared-memory
slot the main process owns, at their rows of the batch; the rest (ids, times: a value per window) comes back
pickled and is put in place by the main process (``merge``). The batch is the one a single process reads — the
same values, dtypes, shapes and key order — so what the loader yields still does not depend on ``num_workers``.

Layout: the main process learns the big arrays (key, row shape, dtype) from the first batch (``Layout``), whose
parts — like those of every batch sent before it came back — are sent back whole (``inline``) and stacked by the
main process; each later part carries their byte offsets for its batch (``Layout.place``). A part whose array does not fit them is sent back
inline, and the main process stacks the parts as ``collate`` would, or raises ``ValueError`` when they disagree.

Slots (``SharedSlots``): files in ``/dev/shm`` made by the main process, mapped by every worker when made (a
message that reaches each worker before any part that uses the slot) and unlinked as soon as every worker has said
it mapped them — or when the pool closes; a slot is reused once no tensor of its batch is referenced any more.
"""

from __future__ import annotations

import math
import mmap
import os
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .shm import SHM_DIR, _close, _dtype, _itemsize, address, create_mapped, dtype_name, map_file, unlink_quietly

MAX_IMBALANCE = 1.5  # a batch whose largest part exceeds this many times an even share is read whole instead


class InSlot:
    """Marks, in a part sent back, an array the worker wrote into the batch's shared slot."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, InSlot)

    def __hash__(self) -> int:
        return 0


IN_SLOT = InSlot()


def split(keys: np.ndarray, workers: int) -> list[np.ndarray] | None:
    """Batch positions of each worker's part: worker ``i`` reads the windows whose key ``% workers == i``; None
    when the parts are too uneven (the largest over ``MAX_IMBALANCE`` even shares: one worker would do most of
    the batch while the others wait)."""
    owner = np.asarray(keys, dtype=np.int64) % workers
    parts = [np.flatnonzero(owner == i) for i in range(workers)]
    if max(len(p) for p in parts) > MAX_IMBALANCE * len(keys) / workers:
        return None
    return parts


@dataclass(frozen=True)
class Layout:
    """The big arrays of a batch: per key, its row shape (the shape without the batch dimension) and dtype name."""

    rows: tuple[tuple[str, tuple[int, ...], str], ...]

    @classmethod
    def from_batch(cls, batch: Any) -> "Layout | None":
        """The layout of a collated batch: its tensors of two or more dimensions. None when the batch is not a
        dict with one batch dimension shared by every value (then batches are not split)."""
        if not isinstance(batch, dict) or not batch:
            return None
        values = list(batch.values())
        if not all(isinstance(v, list) or (isinstance(v, torch.Tensor) and v.ndim >= 1) for v in values):
            return None
        if len({len(v) for v in values}) != 1:
            return None
        rows = tuple((k, tuple(v.shape[1:]), dtype_name(v.dtype))
                     for k, v in batch.items() if isinstance(v, torch.Tensor) and v.ndim >= 2)
        return cls(rows) if rows else None

    def place(self, n: int) -> tuple[list[tuple[str, int, tuple[int, ...], str]], int]:
        """``([(key, byte offset, shape, dtype)], bytes)`` of a batch of ``n`` windows (each array 64-B aligned)."""
        out, end = [], 0
        for key, row, dtype in self.rows:
            shape = (n, *row)
            out.append((key, end, shape, dtype))
            end += -(-(math.prod(shape) * _itemsize(dtype)) // 64) * 64
        return out, end


def _view(mm: mmap.mmap, offset: int, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    """The tensor ``shape`` / ``dtype`` at byte ``offset`` of ``mm`` (writable: shares its memory)."""
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=_dtype(dtype))
    return torch.frombuffer(mm, dtype=_dtype(dtype), count=count, offset=offset).view(shape)


# -- worker side -------------------------------------------------------------------------------------------------


class PartWriter:
    """A worker's mappings of the main process's slots, and the writing of its parts into them."""

    def __init__(self) -> None:
        self._maps: dict[int, tuple[int, mmap.mmap, int]] = {}  # slot -> (generation, mapping, its address)

    def map(self, slot: int, gen: int, path: str) -> None:
        """Map ``path`` (slot ``slot``, generation ``gen``), replacing the slot's older file."""
        mm = map_file(path)
        old = self._maps.pop(slot, None)
        if old is not None:
            _close(old[1])
        self._maps[slot] = (gen, mm, address(mm))

    def _mapped(self, slot: int, gen: int) -> tuple[mmap.mmap, int]:
        have = self._maps.get(slot)
        if have is None or have[0] != gen:
            raise RuntimeError(f"shared batch slot {slot} (generation {gen}) was never mapped by this worker")
        return have[1], have[2]

    def alloc(self, slot: int, gen: int, placed: Sequence[tuple[str, int, tuple[int, ...], str]]
              ) -> Callable[[tuple[int, ...], Any], np.ndarray]:
        """``alloc(shape, dtype)`` for a set's ``read_batch(..., rows=, size=)``: the arrays ``placed``, in their
        order, as views of the slot (the windows are then read straight into their rows); an ordinary array once
        a request does not match the next of them."""
        mm = self._mapped(slot, gen)[0]
        todo = list(placed)

        def make(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
            dtype = np.dtype(dtype)
            if todo and tuple(shape) == todo[0][2] and _name(dtype) == todo[0][3]:
                offset = todo.pop(0)[1]
                return np.frombuffer(mm, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
            todo.clear()
            return np.empty(shape, dtype=dtype)

        return make

    def write(self, batch: dict[str, Any], positions: np.ndarray, size: int, slot: int, gen: int,
              placed: Sequence[tuple[str, int, tuple[int, ...], str]]) -> dict[str, Any]:
        """The part to send back for ``batch`` (windows at rows ``positions`` of a batch of ``size``): its arrays
        that lie at their place in the slot (read there through ``alloc``) or fit it (copied there) replaced by
        ``IN_SLOT``; arrays of ``size`` rows elsewhere cut to this part's rows; other tensors as numpy arrays."""
        mm, address = self._mapped(slot, gen)
        out = dict(batch)
        rows = torch.from_numpy(np.asarray(positions, dtype=np.int64))
        for key, offset, shape, dtype in placed:  # read in place already
            v = out.get(key)
            if isinstance(v, torch.Tensor) and tuple(v.shape) == shape and _name(v.dtype) == dtype and \
                    v.data_ptr() == address + offset:
                out[key] = IN_SLOT
        for key, v in out.items():  # whole-batch arrays elsewhere (or at another's place): this part's rows
            if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == size and len(positions) < size:
                out[key] = v.index_select(0, rows)
        for key, offset, shape, dtype in placed:  # this part's rows: copied to their place
            v = out.get(key)
            if isinstance(v, torch.Tensor) and tuple(v.shape) == (len(positions), *shape[1:]) and \
                    _name(v.dtype) == dtype:
                _view(mm, offset, shape, dtype).index_copy_(0, rows, v)
                out[key] = IN_SLOT
        return inline(out)  # small per-window values: plain bytes when pickled

    def close(self) -> None:
        for _, mm, _ in self._maps.values():
            _close(mm)
        self._maps.clear()


def inline(batch: dict[str, Any]) -> dict[str, Any]:
    """A part to send back whole (no slot yet): its tensors as numpy arrays where numpy has their dtype."""
    out = dict(batch)
    for key, v in out.items():
        if isinstance(v, torch.Tensor):
            try:
                out[key] = v.numpy()
            except TypeError:  # (bfloat16)
                pass
    return out


_IN_SLOT, _ARRAY, _VALUE = 0, 1, 2  # how a part's values travel (``to_wire``)


def to_wire(part: dict[str, Any]) -> tuple[tuple[str, ...], tuple[tuple, ...]]:
    """``part`` (``PartWriter.write`` / ``inline``) as builtins only — keys, and per value ``(0,)`` in the slot,
    ``(1, dtype, shape, bytes)`` a numpy array, ``(2, value)`` anything else —: no class to look up when unpickled
    (numpy arrays and ``IN_SLOT`` markers cost the main process more to unpickle than the rest of a batch)."""
    values = []
    for v in part.values():
        if isinstance(v, InSlot):
            values.append((_IN_SLOT,))
        elif isinstance(v, np.ndarray) and not v.dtype.hasobject:
            values.append((_ARRAY, v.dtype.str, v.shape, v.tobytes()))
        else:
            values.append((_VALUE, v))
    return tuple(part), tuple(values)


def from_wire(wire: tuple[tuple[str, ...], tuple[tuple, ...]]) -> dict[str, Any]:
    """The part that ``to_wire`` sent (its arrays read-only views of the bytes received)."""
    keys, values = wire
    out: dict[str, Any] = {}
    for key, v in zip(keys, values):
        if v[0] == _IN_SLOT:
            out[key] = IN_SLOT
        elif v[0] == _ARRAY:
            out[key] = np.frombuffer(v[3], dtype=np.dtype(v[1])).reshape(v[2])
        else:
            out[key] = v[1]
    return out


def _name(dtype: Any) -> str:
    """The torch name (``"float32"``) of a torch or numpy dtype."""
    if not isinstance(dtype, torch.dtype):
        dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    return dtype_name(dtype)


# -- main side ---------------------------------------------------------------------------------------------------


class SharedSlots:
    """The main process's slots for split batches (at most ``max_slots``), files named ``mmloader-<tag>-...``.
    ``take(nbytes)`` → ``(slot, gen, new path or None)``: a free slot of at least ``nbytes`` (a new file — made,
    or grown — whose path every worker must map before the slot is used), or None when all are taken;
    ``acked(slot, gen)`` counts the workers that mapped it (the file's name goes once all have); ``views`` gives
    a batch's arrays, viewing the slot, which becomes free again once none of them is referenced."""

    def __init__(self, tag: str, workers: int, max_slots: int):
        self.tag, self.workers, self.max_slots = tag, workers, max_slots
        self._maps: dict[int, mmap.mmap] = {}
        self._gen: dict[int, int] = {}
        self._paths: dict[tuple[int, int], str] = {}
        self._acks: dict[tuple[int, int], int] = {}
        # slots given back: appended to by finalizers, in whichever thread drops a batch (single deque operations
        # are atomic, iterating is not), moved to ``_idle`` (this thread's own) by ``take``
        self.free: deque[int] = deque()
        self._idle: list[int] = []
        self._made = 0

    def take(self, nbytes: int) -> tuple[int, int, str | None] | None:
        while True:
            try:
                self._idle.append(self.free.popleft())
            except IndexError:
                break
        fits = [s for s in self._idle if len(self._maps[s]) >= nbytes]
        if fits:
            self._idle.remove(fits[-1])
            return fits[-1], self._gen[fits[-1]], None
        if self._idle:
            slot = self._idle.pop()
        elif self._made < self.max_slots:
            slot, self._made = self._made, self._made + 1
        else:
            return None
        gen = self._gen.get(slot, -1) + 1
        path = os.path.join(SHM_DIR, f"mmloader-{self.tag}-{slot}-{gen}")
        mm = create_mapped(path, nbytes)
        old = self._maps.pop(slot, None)
        if old is not None:
            _close(old)
        self._maps[slot], self._gen[slot] = mm, gen
        self._paths[(slot, gen)], self._acks[(slot, gen)] = path, 0
        return slot, gen, path

    def acked(self, slot: int, gen: int) -> None:
        """One more worker has mapped ``(slot, gen)``; once all have, its file's name is removed."""
        key = (slot, gen)
        if key not in self._acks:
            return
        self._acks[key] += 1
        if self._acks[key] >= self.workers:
            del self._acks[key]
            unlink_quietly(self._paths.pop(key))

    def views(self, slot: int, placed: Sequence[tuple[str, int, tuple[int, ...], str]]) -> dict[str, torch.Tensor]:
        """The arrays ``placed`` in ``slot``; the slot is free again once they (and views of them) are all gone."""
        mm = self._maps[slot]
        used = max((off + math.prod(shape) * _itemsize(dt) for _, off, shape, dt in placed), default=0)
        if used == 0:
            self.free.append(slot)
            return {k: torch.empty(shape, dtype=_dtype(dt)) for k, _, shape, dt in placed}
        base = np.frombuffer(mm, dtype=np.uint8, count=used)
        weakref.finalize(base, self.free.append, slot)
        out = {}
        for key, off, shape, dt in placed:
            n = math.prod(shape) * _itemsize(dt)
            out[key] = (torch.from_numpy(base[off:off + n]).view(_dtype(dt)).reshape(shape) if n
                        else torch.empty(shape, dtype=_dtype(dt)))
        return out

    def close(self) -> None:
        for mm in self._maps.values():
            _close(mm)
        self._maps.clear()
        for path in self._paths.values():
            unlink_quietly(path)
        self._paths.clear()


def merge(parts: Sequence[tuple[np.ndarray, dict[str, Any]]], n: int, views: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The batch of ``n`` windows made of ``parts`` (``(positions, part)``, as ``PartWriter.write`` sent them):
    an ``IN_SLOT`` array is its view in ``views``; per-window values are put at their positions (tensors of the
    parts' dtype, lists). ``ValueError`` when the parts disagree (keys, kinds, row shapes or dtypes)."""
    keys = list(parts[0][1])
    for _, part in parts[1:]:
        if list(part) != keys:
            raise ValueError(f"the parts of a batch read by different loader workers have different keys: {keys} "
                             f"and {list(part)}")
    out: dict[str, Any] = {}
    for key in keys:
        values = [(pos, part[key]) for pos, part in parts]
        if all(isinstance(v, InSlot) for _, v in values):
            out[key] = views[key]
        elif all(isinstance(v, list) for _, v in values):
            filled: list[Any] = [None] * n
            for pos, v in values:
                for p, x in zip(pos.tolist(), v):
                    filled[p] = x
            out[key] = filled
        elif all(isinstance(v, (np.ndarray, torch.Tensor)) for _, v in values):
            out[key] = _stack(key, values, n)
        else:
            raise ValueError(f"batch key {key!r}: the parts read by different loader workers disagree "
                             f"({sorted({type(v).__name__ for _, v in values})}): windows of different shapes "
                             f"cannot be stacked")
    return out


def _stack(key: str, values: list[tuple[np.ndarray, Any]], n: int) -> torch.Tensor:
    arrays = [(pos, v.numpy() if isinstance(v, torch.Tensor) and v.dtype != torch.bfloat16 else v)
              for pos, v in values]
    first = arrays[0][1]
    for _, a in arrays[1:]:
        if a.shape[1:] != first.shape[1:] or a.dtype != first.dtype:
            raise ValueError(f"batch key {key!r}: windows of different shapes or dtypes cannot be stacked "
                             f"({tuple(first.shape[1:])} {first.dtype} and {tuple(a.shape[1:])} {a.dtype})")
    if isinstance(first, torch.Tensor):  # (bfloat16)
        out = torch.empty((n, *first.shape[1:]), dtype=first.dtype)
        for pos, a in arrays:
            out[torch.from_numpy(np.asarray(pos, dtype=np.int64))] = a
        return out
    stacked = np.empty((n, *first.shape[1:]), dtype=first.dtype)
    for pos, a in arrays:
        stacked[pos] = a
    return torch.from_numpy(stacked)
