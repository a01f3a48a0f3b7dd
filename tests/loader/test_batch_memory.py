"""Batches read in the calling process (0 workers) reuse their buffers (``mmloader.batch_memory``) only once every
array, view and tensor of a batch is gone: a batch that is kept never changes."""

from __future__ import annotations

import gc

import numpy as np
import torch

import mmloader
from mmloader.batch_memory import BatchMemory


def test_a_buffer_comes_back_only_when_every_view_is_gone():
    pool = BatchMemory(keep=2)
    arena = pool.arena()
    data = arena((4, 3, 100), np.float32)
    mask = arena((4, 100), np.bool_)
    assert data.ctypes.data % 64 == 0 and mask.ctypes.data % 64 == 0
    assert not np.shares_memory(data, mask)
    data[:] = 1.5
    tensor = torch.from_numpy(data)[1:]  # a view of a view, as a caller may keep
    del arena, data, mask
    gc.collect()
    assert pool._free == []  # the tensor still holds the buffer
    again = pool.arena()((4, 3, 100), np.float32)
    again[:] = -1.0  # another buffer: the kept tensor is untouched
    assert bool((tensor == 1.5).all())
    del tensor
    gc.collect()
    assert len(pool._free) == 1
    del again
    gc.collect()
    assert len(pool._free) == 2
    free = list(pool._free)
    reused = pool.arena()((4, 3, 100), np.float32)  # taken from the pool, not new
    assert len(pool._free) == 1 and any(np.shares_memory(reused, b) for b in free)
    big = pool.arena()((512, 6, 1000), np.float32)  # 12 MB: fits no free buffer, so a new one
    assert big.shape == (512, 6, 1000) and len(pool._free) == 1
    assert not any(np.shares_memory(big, b) for b in free)


def test_a_loader_without_workers_never_changes_a_kept_batch(sample_store):
    ws = mmloader.open(sample_store()).windows(sec=2.0, stride=1.0, modalities=["imu"])
    loader = ws.loader(batch_size=4, shuffle=True, seed=3)
    kept = [(b["imu"], b["imu"].clone()) for b in loader]  # every batch kept while the next ones are read
    assert len(kept) >= 3
    for held, copy in kept:
        assert torch.equal(held, copy)
    ptrs = set()
    for _ in range(2):  # batches dropped as they go: their buffers are reused
        for b in loader:
            ptrs.add(b["imu"].data_ptr())
            del b
    assert len(ptrs) <= 3
    want = [ws.read_batch(idx) for idx in np.array_split(loader.order(loader.epoch), range(4, len(ws), 4))]
    for got, w in zip(loader, want):
        assert torch.equal(got["imu"], w["imu"]) and torch.equal(got["imu_mask"], w["imu_mask"])
