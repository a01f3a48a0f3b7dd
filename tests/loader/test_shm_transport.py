"""Batches from workers through reused shared-memory slots (``mmloader.shm``): exact for every dtype and layout,
owned by the receiver, and no file left in /dev/shm, even when a worker is killed."""

from __future__ import annotations

import gc
import math
import os
import signal
import time

import numpy as np
import pytest
import torch

from mmloader import shm
from mmloader.loader import WindowLoader, WorkerError

pytestmark = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm here (not Linux)")


class Numbers:
    """A window set in memory: window i is a few tensors of every common dtype, all derived from i."""

    def __init__(self, n: int = 40):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"index": i, "x": torch.randn(6, 50, generator=g), "mask": torch.arange(50) % (i + 2) == 0,
                "code": torch.tensor([i, -i], dtype=torch.int64), "half": torch.randn(3, generator=g).to(torch.bfloat16),
                "name": f"w{i}"}


def _files(tag: str = "") -> list[str]:
    return sorted(n for n in os.listdir(shm.SHM_DIR) if n.startswith(f"mmloader-{tag}"))


def test_round_trip_of_every_dtype_and_layout():
    writer, reader = shm.SlotWriter(2, "test-rt"), shm.SlotReader("test-rt")
    batch = {"f32": torch.randn(4, 5), "f64": torch.randn(3, dtype=torch.float64), "b": torch.rand(7) > 0.5,
             "bf16": torch.randn(5).to(torch.bfloat16), "u8": torch.randint(0, 255, (2, 3), dtype=torch.uint8),
             "i64": torch.arange(9), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
             "strided": torch.randn(6, 8)[:, ::2], "nested": [(torch.ones(2), "s"), {"k": torch.zeros(1)}],
             "text": ["a", "b"], "n": 3}
    released: list[int] = []
    try:
        path, layout = writer.write(0, batch)
        assert path is not None and os.path.exists(path)
        out = reader.read(0, path, layout, lambda: released.append(0))
        assert not os.path.exists(path)  # unlinked once mapped
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                got = out[key]
                assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(got, value), key
        assert torch.equal(out["nested"][0][0], batch["nested"][0][0]) and out["nested"][0][1] == "s"
        assert torch.equal(out["nested"][1]["k"], batch["nested"][1]["k"])
        assert out["text"] == ["a", "b"] and out["n"] == 3
        # the slot is handed back only once every tensor of the batch, views included, is gone
        view = out["f32"][1:3]
        del out, got
        gc.collect()
        assert released == []
        del view
        gc.collect()
        assert released == [0]
        path2, layout2 = writer.write(0, {"f32": torch.full((4, 5), 7.0)})
        assert path2 is None  # the slot is reused, not remade
        again = reader.read(0, path2, layout2, lambda: released.append(1))
        assert torch.equal(again["f32"], torch.full((4, 5), 7.0))
        big = {"x": torch.randn(1 << 19)}  # 2 MiB: the slot grows (a new file)
        del again
        path3, layout3 = writer.write(0, big)
        assert path3 is not None and torch.equal(reader.read(0, path3, layout3, lambda: None)["x"], big["x"])
    finally:
        writer.close()
        reader.close()
    assert _files("test-rt") == []


def _epoch(loader) -> list[dict]:
    return list(loader)


@pytest.mark.parametrize("shuffle", [False, True])
def test_worker_batches_equal_in_process_batches_and_stay_intact(shuffle):
    ref = _epoch(WindowLoader(Numbers(), batch_size=4, shuffle=shuffle, num_workers=0))
    loader = WindowLoader(Numbers(), batch_size=4, shuffle=shuffle, num_workers=2, prefetch=2)
    try:
        kept = _epoch(loader)  # every batch kept while the workers reuse their slots for the later ones
        assert loader._pool is not None and any(r._maps for r in loader._pool.readers)  # slots were used
        tags = [r.tag for r in loader._pool.readers]
        assert len(kept) == len(ref)
        for a, b in zip(kept, ref):
            assert a.keys() == b.keys()
            for key in a:
                if isinstance(a[key], torch.Tensor):
                    assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
                else:
                    assert a[key] == b[key]
        second = _epoch(loader)  # a second epoch on the same (persistent) workers and slots
        assert len(second) == len(ref) and sorted(i for b in second for i in b["index"].tolist()) == list(range(40))
    finally:
        loader.close()
    assert all(_files(tag) == [] for tag in tags)


@pytest.mark.parametrize("shuffle", [False, "block"])
def test_batches_that_wait_behind_another_workers_run_still_go_through_slots(shuffle, monkeypatch):
    """In index order (and block shuffle) each worker reads contiguous runs; a worker's finished run waits, in order,
    behind the other worker's. Those waiting batches must not overflow its slots (then they would be pickled): the
    dispatcher holds a worker back instead, and every batch arrives through shared memory, in order."""
    from mmloader import loader as loader_mod

    kinds: list[str] = []
    take = loader_mod._WorkerPool._take
    monkeypatch.setattr(loader_mod._WorkerPool, "_take", lambda self, i, msg, buf: kinds.append(msg[0]) or
                        take(self, i, msg, buf))
    loader = WindowLoader(Numbers(160), batch_size=2, shuffle=shuffle, num_workers=2, prefetch=2,
                          block_windows=20, buffer_blocks=1)
    loader.run_batches = 10  # runs of 10 batches: longer than a worker's slots beyond its queue
    try:
        got = [b["index"].tolist() for b in loader]
    finally:
        loader.close()
    assert sorted(i for b in got for i in b) == list(range(160))
    assert got == [x.tolist() for x in np.array_split(loader.order(0), 80)]
    assert len(kinds) == 80 and set(kinds) == {"shm"}, kinds


class Dies(Numbers):
    def __getitem__(self, i: int) -> dict:
        if i == 30:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(i)


def test_a_killed_worker_leaves_no_file():
    loader = WindowLoader(Dies(), batch_size=4, num_workers=2)
    # the pool's slot tags, taken before iterating: the worker may die before the first batch is yielded
    tags = [r.tag for r in loader._get_pool().readers]
    with pytest.raises(WorkerError, match="killed by signal SIGKILL|SIGKILL"):
        for _ in loader:
            pass
    loader.close()
    deadline = time.monotonic() + 5
    while any(_files(tag) for tag in tags) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tags and all(_files(tag) == [] for tag in tags)


def test_arrays_read_straight_into_a_slot_are_sent_without_a_copy():
    """``SlotWriter.arena``: a batch read into its slot is found there by ``write`` (its refs point at it); a batch
    that no longer fits makes the slot grow, every tensor then copied; either way the reader sees the same data."""
    writer, reader = shm.SlotWriter(1, "test-arena"), shm.SlotReader("test-arena")
    try:
        arena = writer.arena(0)
        data = arena((4, 3, 10), np.float32)
        mask = arena((4, 10), np.bool_)
        data[...] = np.arange(120, dtype=np.float32).reshape(4, 3, 10)
        mask[...] = np.arange(40).reshape(4, 10) % 3 == 0
        batch = {"x": torch.from_numpy(data), "x_mask": torch.from_numpy(mask), "index": torch.arange(4), "id": ["a"] * 4}
        path, layout = writer.write(0, batch)
        used, refs = layout
        assert refs["x"].offset == 0 and refs["x_mask"].offset >= data.nbytes  # where the arena put them
        assert used == max(r.offset + math.prod(r.shape) * b.element_size()  # the bytes the batch spans
                           for r, b in ((refs[k], batch[k]) for k in ("x", "x_mask", "index")))
        assert refs["id"] == ["a"] * 4  # a flat batch: its plain values as they are
        out = reader.read(0, path, layout, lambda: None)
        for key in ("x", "x_mask", "index"):
            assert torch.equal(out[key], batch[key]), key
        del out, data, mask, batch
        arena = writer.arena(0)
        small = arena((2,), np.int64)
        small[...] = [7, 8]
        big = torch.randn(1 << 20)  # 4 MiB more than the slot holds: it grows, both are copied
        path, layout = writer.write(0, {"s": torch.from_numpy(small), "big": big})
        assert path is not None
        out = reader.read(0, path, layout, lambda: None)
        assert out["s"].tolist() == [7, 8] and torch.equal(out["big"], big)
    finally:
        writer.close()
        reader.close()
    assert _files("test-arena") == []


def test_imu_batches_from_workers_equal_in_process_batches(tmp_path):
    """IMU windows (``read_batch`` into the workers' slots) at 2 workers: the same batches as at 0 workers."""
    import mmloader

    rng = np.random.default_rng(0)
    recs = []
    for r in range(6):
        t = np.arange(3000, dtype=np.int64) * 5_000_000 + r * 7
        recs.append(mmloader.Recording(id=f"r{r}", timeseries={"imu": mmloader.TimeSeriesInput(
            t, rng.standard_normal((t.size, 6)).astype(np.float32), list("abcdef"), ["u"] * 6, rate_hz=200.0)}))
    ws = mmloader.open(mmloader.write_store(tmp_path / "s", recs)).windows(sec=2.0, stride=0.5, modalities=["imu"])
    for shuffle in (False, True, "block"):
        ref = list(ws.loader(batch_size=16, shuffle=shuffle, num_workers=0, block_windows=8))
        loader = ws.loader(batch_size=16, shuffle=shuffle, num_workers=2, block_windows=8)
        try:
            got = list(loader)
        finally:
            loader.close()
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            assert list(a) == list(b)
            for key in a:
                if isinstance(a[key], torch.Tensor):
                    assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (shuffle, key)
                else:
                    assert a[key] == b[key]


def _dispatch_time(workers: int, n_batches: int, block: int, per_worker: int = 2) -> float:
    """Time the real ``_WorkerPool`` dispatcher (``_slots_for``, ``_tasks``, ``_dispatch``) needs for ``n_batches`` in
    index-order runs of ``block`` batches, in a discrete-event model: each worker takes 1 time unit a batch, one at a
    time; the consumer takes batches in order, instantly. No processes: fake pipes record what is sent."""
    import collections
    import heapq

    from mmloader import loader as loader_mod

    pool = loader_mod._WorkerPool.__new__(loader_mod._WorkerPool)
    pool.procs, pool.per_worker, pool._freed, pool.timeout = [None] * workers, per_worker, collections.deque(), None
    pool.inflight = [collections.deque() for _ in range(workers)]
    pool.slots = per_worker + 2 + loader_mod.REORDER_SLOTS
    pool.tasks = [type("Pipe", (), {"send": lambda self, msg: None})() for _ in range(workers)]
    free_at, events, now = [0.0] * workers, [], [0.0]

    def send(i, task):
        pool.inflight[i].append(task[:2])
        free_at[i] = max(now[0], free_at[i]) + 1.0
        heapq.heappush(events, (free_at[i], i, task[0]))

    pool._send = send
    pool._slots_for(block)
    todo, buffer = pool._tasks([[j] for j in range(n_batches)], block), {}
    for k in range(n_batches):
        pool._dispatch(todo, k, block, buffer)
        while k not in buffer:
            now[0], i, j = heapq.heappop(events)
            pool.inflight[i].popleft()
            buffer[j] = True
            pool._dispatch(todo, k, block, buffer)
        buffer.pop(k)
    return now[0]


@pytest.mark.parametrize("workers,block", [(2, 8), (2, 10), (4, 16), (8, 64)])
def test_runs_waiting_for_their_turn_do_not_hold_workers_back(workers, block):
    """Whatever the run length, the slot cap leaves every worker busy: an epoch of 6 rounds of runs takes about
    n / workers time units (one unit a batch), not the time of workers taking turns."""
    n = workers * block * 6
    took = _dispatch_time(workers, n, block)
    assert took <= n / workers + block, (took, n / workers)


def test_a_layout_past_the_end_of_its_slot_is_refused():
    """A layout that says the batch spans more bytes than the slot holds (a corrupt or mismatched message) raises,
    naming the slot, instead of handing out tensors that read past the mapping."""
    writer, reader = shm.SlotWriter(1, "test-past"), shm.SlotReader("test-past")
    try:
        path, (used, tree) = writer.write(0, {"x": torch.arange(10.0), "id": ["a"] * 10})
        with pytest.raises(ValueError, match="slot 0"):
            reader.read(0, path, (used + (64 << 20), tree), lambda: None)
        out = reader.read(0, None, (used, tree), lambda: None)  # the true layout still reads
        assert torch.equal(out["x"], torch.arange(10.0)) and out["id"] == ["a"] * 10
    finally:
        writer.close()
        reader.close()
    assert _files("test-past") == []
