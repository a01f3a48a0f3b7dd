"""Batches handed from a loader worker to the main process through shared memory that the worker reuses.

Pickling a batch of tensors with torch.multiprocessing's reductions puts every tensor into a fresh shared-memory
segment and passes its file descriptor through a socket: ~16 ms for a batch of 256 five-second IMU windows (6 MB),
as long as reading the batch. Here each worker owns a few *slots* — files in ``/dev/shm``, mapped once and reused —
and writes a batch's tensors into a free slot, sending only their layout (``TensorRef``) with the rest of the batch
pickled as usual. The main process maps a slot once and hands out tensors that view it, without a copy; the slot is
freed for the worker only once every tensor (and view) of that batch is gone, so nothing a user keeps can change
under them. A worker with no free slot (the user holds several batches) pickles that batch instead.

Lifetime: the main process unlinks a slot's file as soon as it has mapped it, so the name leaves ``/dev/shm`` at
once and the memory goes when both processes have unmapped it; a worker also removes, at exit, any file of its own
that is still there. Where ``/dev/shm`` is missing (not Linux), ``available()`` is False and the loader pickles.
"""

from __future__ import annotations

import functools
import itertools
import math
import mmap
import os
import weakref
from collections import deque
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

SHM_DIR = "/dev/shm"
ALIGN = 64  # bytes: every tensor starts on a cache line
GROW = 1 << 20  # slots are sized in whole MiB, with a quarter of headroom when they grow


def available() -> bool:
    """Whether slots can be made here (a writable ``/dev/shm``)."""
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


class TensorRef(NamedTuple):
    """Where a tensor of a batch lies in its slot: byte ``offset``, dtype name (``"float32"``) and shape. (A named
    tuple: made, pickled and read back per tensor of every batch, it costs a fraction of a dataclass.)"""

    offset: int
    dtype: str
    shape: tuple[int, ...]


_CONTAINERS = (torch.Tensor, TensorRef, dict, list, tuple)


def _walk(obj: Any, leaf: Callable[[Any], Any]) -> Any:
    """``obj`` with ``leaf`` applied to every tensor / TensorRef inside dicts, lists and tuples."""
    if isinstance(obj, (torch.Tensor, TensorRef)):
        return leaf(obj)
    if isinstance(obj, dict):
        return {k: _walk(v, leaf) for k, v in obj.items()}
    if isinstance(obj, list):
        if not any(issubclass(t, _CONTAINERS) for t in set(map(type, obj))):  # e.g. a batch's ids: nothing to do
            return obj
        return [_walk(v, leaf) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_walk(v, leaf) for v in obj)
    return obj


def create_mapped(path: str, nbytes: int) -> mmap.mmap:
    """A new file ``path`` (never an existing one) of at least ``nbytes`` — whole MiB, with a quarter of headroom
    so that a slot grows rarely —, mapped read-write."""
    size = -(-(nbytes + nbytes // 4) // GROW) * GROW
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def map_file(path: str) -> mmap.mmap:
    """The whole of the existing file ``path``, mapped read-write."""
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def address(mm: mmap.mmap) -> int:
    """Where ``mm`` is mapped in this process (to find arrays that lie inside it)."""
    probe = np.frombuffer(mm, dtype=np.uint8, count=1)
    try:
        return probe.ctypes.data
    finally:
        del probe


def unlink_quietly(path: str) -> None:
    """Remove ``path`` if it is still there."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _close(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # arrays still view it: it is unmapped when the last of them goes
        pass


@functools.lru_cache(maxsize=None)
def dtype_name(dtype: torch.dtype) -> str:
    """The name of a torch dtype as batch layouts carry it (``torch.float32`` → ``"float32"``)."""
    return str(dtype).rsplit(".", 1)[-1]


@functools.lru_cache(maxsize=None)
def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


@functools.lru_cache(maxsize=None)
def _itemsize(name: str) -> int:
    """Bytes per element of the torch dtype called ``name``."""
    return torch.empty((), dtype=_dtype(name)).element_size()


class SlotWriter:
    """A worker's ``n_slots`` slots. ``acquire`` → a free slot; ``write(slot, batch)`` → (path of a slot file the
    main process has not mapped yet or None, the batch with each tensor replaced by its ``TensorRef``)."""

    def __init__(self, n_slots: int, tag: str):
        # taken and given back at the right end (last in, first out): a slot made once is reused while it is free,
        # so a worker maps no more slots than it ever has batches out at once
        self.free: deque[int] = deque(range(n_slots - 1, -1, -1))
        self.n_slots = n_slots
        self._maps: dict[int, mmap.mmap] = {}
        self._base: dict[int, int] = {}
        self.new_paths: dict[int, str] = {}  # slot -> its file, made since the main process last heard of it
        self._made: list[str] = []
        self._tag = tag
        self._gen = itertools.count()

    def grow(self, n_slots: int) -> None:
        """Have ``n_slots`` slots (never fewer than now); the new ones are taken after every free old one."""
        self.free.extendleft(range(self.n_slots, n_slots))
        self.n_slots = max(self.n_slots, n_slots)

    def _map(self, slot: int, size: int) -> None:
        """Make ``slot`` at least ``size`` bytes (a new file, in ``new_paths`` until ``write`` reports it)."""
        mm = self._maps.get(slot)
        if mm is not None and len(mm) >= size:
            return
        path = os.path.join(SHM_DIR, f"mmloader-{self._tag}-{os.getpid()}-{slot}-{next(self._gen)}")
        new = create_mapped(path, size)
        self._made.append(path)
        unsent = self.new_paths.pop(slot, None)
        if unsent is not None:  # made earlier for this batch and never reported: nobody will map it
            os.unlink(unsent)
        self.new_paths[slot] = path
        if mm is not None:
            _close(mm)  # arrays of a batch still held (read into it) keep it mapped until they go
        self._maps[slot] = new
        self._base[slot] = address(new)  # to find tensors read into it

    def arena(self, slot: int) -> "SlotArena":
        """An allocator of arrays inside ``slot`` for the batch about to be written to it."""
        return SlotArena(self, slot)

    def _inside(self, slot: int, t: torch.Tensor) -> int | None:
        """The byte offset of ``t`` in ``slot`` when its memory lies there (allocated by ``arena``), else None."""
        mm = self._maps.get(slot)
        if mm is None or not t.is_contiguous() or t.numel() == 0:
            return None
        off = t.data_ptr() - self._base[slot]
        return off if 0 <= off and off + t.numel() * t.element_size() <= len(mm) else None

    def write(self, slot: int, batch: Any) -> tuple[str | None, tuple[int, Any]]:
        """Put ``batch``'s tensors in ``slot`` (those read into it through ``arena`` stay where they are) →
        ``(new file or None, layout)``; ``layout`` = (bytes used, the batch with each tensor replaced by its
        ``TensorRef``), for ``SlotReader.read``."""
        items: list[torch.Tensor] = []
        _walk(batch, lambda t: items.append(t) or t)
        refs, used = self._place(slot, items)
        it = iter(refs)
        return self.new_paths.pop(slot, None), (used, _walk(batch, lambda t: next(it)))

    def _place(self, slot: int, items: list[torch.Tensor]) -> tuple[list[TensorRef], int]:
        """Where ``items`` lie in ``slot`` (copied there unless read there already; the slot grown when they do not
        fit, every one copied then) and the bytes they span."""
        offs = [self._inside(slot, t) for t in items]
        size = [-(-(t.numel() * t.element_size()) // ALIGN) * ALIGN for t in items]
        end = max((off + n for off, n in zip(offs, size) if off is not None), default=0)
        need = end + sum(n for off, n in zip(offs, size) if off is None)
        mm = self._maps.get(slot)
        if mm is None or need > len(mm):  # grow: nothing stays where it was, every tensor is copied
            offs, end = [None] * len(items), 0
            self._map(slot, max(sum(size), 1))
            mm = self._maps[slot]
        refs, used = [], 0
        for t, off in zip(items, offs):
            if off is None:  # not read into the slot: copy its bytes there
                raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                if raw.size:
                    np.copyto(np.frombuffer(mm, dtype=np.uint8, count=raw.size, offset=end), raw)
                off, end = end, -(-(end + raw.size) // ALIGN) * ALIGN
            refs.append(TensorRef(off, dtype_name(t.dtype), tuple(t.shape)))
            used = max(used, off + t.numel() * t.element_size())
        return refs, used

    def close(self) -> None:
        """Unmap the slots and remove any of this worker's files the main process did not take."""
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:
                pass
        self._maps.clear()
        for path in self._made:
            unlink_quietly(path)


class Arena:
    """An allocator ``(shape, dtype) -> array`` for one batch: arrays carved one after another from a block of
    memory (``_memory``), each starting on a cache line of it; a request that does not fit gets an ordinary array.
    Subclasses say where the block is (``SlotArena``: a worker's slot; ``mmloader.batch_memory``: a pooled buffer)."""

    def __init__(self) -> None:
        self.end = 0  # bytes of the block given out so far

    def _memory(self, nbytes: int) -> Any:
        """The block (a buffer, whose start is aligned) for a request of ``nbytes > 0``, or None for none."""
        raise NotImplementedError

    def __call__(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        n = count * dtype.itemsize
        mem = self._memory(n) if n else None
        if mem is None or self.end + n > len(mem):
            return np.empty(shape, dtype=dtype)
        off, self.end = self.end, -(-(self.end + n) // ALIGN) * ALIGN
        return np.frombuffer(mem, dtype=dtype, count=count, offset=off).reshape(shape)


class SlotArena(Arena):
    """Arrays allocated inside one slot (``SlotWriter.arena``), for a batch read straight into them: ``write`` then
    finds them there and copies nothing. The first allocation may grow the slot (nothing is in it yet); a later one
    that does not fit gets an ordinary array (copied by ``write``)."""

    def __init__(self, writer: SlotWriter, slot: int):
        super().__init__()
        self.writer, self.slot = writer, slot

    def _memory(self, nbytes: int) -> mmap.mmap | None:
        if self.end == 0:
            self.writer._map(self.slot, nbytes)
        return self.writer._maps.get(self.slot)


class SlotReader:
    """The main process's view of one worker's slots (files named ``mmloader-<tag>-...``). ``read`` returns the
    batch with its tensors *in* the slot (no copy); ``release()`` is called once none of them is referenced any
    more (every tensor and view of them gone), and only then may the worker write that slot again. ``close`` also
    removes any file of that tag still in ``/dev/shm`` (a worker killed before its batch was received leaves one)."""

    def __init__(self, tag: str) -> None:
        self._maps: dict[int, mmap.mmap] = {}
        self.tag = tag

    def _mapped(self, slot: int, path: str | None) -> mmap.mmap:
        if path is not None:  # a new (or grown) slot: map it, then unlink its name
            try:
                mm = map_file(path)
            finally:
                os.unlink(path)
            old = self._maps.pop(slot, None)
            if old is not None:
                _close(old)
            self._maps[slot] = mm
        return self._maps[slot]

    def read(self, slot: int, path: str | None, layout: tuple[int, Any], release: Callable[[], None]) -> Any:
        """The batch of ``layout`` (``SlotWriter.write``'s), its tensors viewing ``slot`` (mapped from ``path``
        when that is a new file); ``release()`` once none of them (or their views) is referenced any more."""
        mm = self._mapped(slot, path)
        used, tree = layout
        if used == 0:
            release()
            return _walk(tree, lambda r: torch.empty(r.shape, dtype=_dtype(r.dtype)))
        if used > len(mm):
            raise ValueError(f"a batch said to span {used} bytes of shared-memory slot {slot}, which has {len(mm)}")
        base = np.frombuffer(mm, dtype=np.uint8, count=used)  # every tensor below is a view of this array
        weakref.finalize(base, release)

        def view(ref: TensorRef) -> torch.Tensor:
            dtype = _dtype(ref.dtype)
            n = math.prod(ref.shape) * _itemsize(ref.dtype)
            if n == 0:
                return torch.empty(ref.shape, dtype=dtype)
            return torch.from_numpy(base[ref.offset:ref.offset + n]).view(dtype).reshape(ref.shape)

        return _walk(tree, view)

    def close(self) -> None:
        for mm in self._maps.values():
            _close(mm)  # a mapping whose tensors are still held closes when they go
        self._maps.clear()
        prefix = f"mmloader-{self.tag}-"
        try:
            names = [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]
        except OSError:
            return
        for name in names:
            unlink_quietly(os.path.join(SHM_DIR, name))
