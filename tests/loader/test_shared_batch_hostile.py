"""Hostile tests of shuffled batches split across loader workers (``mmloader.shared_batch``): whatever the set
(derived sets, window caches, several streams, recordings that cannot be stacked), the number of workers, the
batch size, resuming, holding batches, killing or stopping a worker, the batches are those of ``num_workers=0``
bit for bit, errors keep their type, and nothing is left in ``/dev/shm``.

The last tests pin defects this review found, since fixed (each docstring says what went wrong before)."""

from __future__ import annotations

import gc
import os
import re
import signal
import time

import numpy as np
import pytest
import torch

from conftest import PartFailure, Wrapped, assert_batches, assert_same, bits, kill_leftovers, wait_gone
from mmloader import shared_batch as sb
from mmloader import shm
from mmloader.loader import WindowLoader, WorkerError

pytestmark = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm here (not Linux)")

MS = 1_000_000  # ns


# -- helpers ------------------------------------------------------------------------------------------------------


def _leftovers() -> list[str]:
    """This process's loader files still in /dev/shm."""
    return sorted(n for n in os.listdir(shm.SHM_DIR) if n.startswith(f"mmloader-{os.getpid()}-"))


def _frozen(batches: list[dict]) -> list[dict]:
    """Deep copies (the reference must not share memory with anything under test)."""
    return [{k: (v.clone() if isinstance(v, torch.Tensor) else list(v) if isinstance(v, list) else v)
             for k, v in b.items()} for b in batches]


def reference(windows, **kw) -> list[dict]:
    return _frozen(list(WindowLoader(windows, num_workers=0, **kw)))


def _split_was_used(loader: WindowLoader) -> bool:
    """Whether the loader's (live) pool has split batches into a shared slot."""
    pool = loader._pool
    return pool is not None and pool.layout is not None and pool.shared is not None and pool.shared._made >= 1


def run(windows, workers: int, epochs: int = 1, **kw) -> tuple[list[list[dict]], bool]:
    """Every batch of ``epochs`` passes with ``workers`` workers (the loader is closed after), and whether batches
    were split into shared slots (``_split_was_used`` before the close)."""
    loader = WindowLoader(windows, num_workers=workers, **kw)
    try:
        out = [list(loader) for _ in range(epochs)]
        used = _split_was_used(loader)
    finally:
        loader.close()
    return out, used


def _series(r: int, n: int, hz: float, channels: int, rng, gap_at: int | None = None):
    import mmloader

    t = np.arange(n, dtype=np.int64) * int(round(1e9 / hz)) + r * 7
    if gap_at is not None:
        t[gap_at:] += 700 * MS
    return t, mmloader.TimeSeriesInput(t, rng.standard_normal((n, channels)).astype(np.float32),
                                       list("abcdefgh"[:channels]), ["u"] * channels, rate_hz=hz)


def _imu_dataset(tmp_path_factory, name: str, seed: int, lengths: list[int], channels: list[int] | None = None,
                 prefix: str = "r", splits: bool = False):
    """A store of one 6-channel (or ``channels[r]``) 200 Hz IMU recording per entry of ``lengths`` (samples),
    ids ``<prefix><r>`` (``splits``: every third one "val", the others "train"), opened."""
    import mmloader

    rng = np.random.default_rng(seed)
    recs = []
    for r, n in enumerate(lengths):
        _, ts = _series(r, n, 200.0, 6 if channels is None else channels[r], rng)
        split = {"split": "train" if r % 3 else "val"} if splits else {}
        recs.append(mmloader.Recording(id=f"{prefix}{r}", timeseries={"imu": ts}, **split))
    return mmloader.open(mmloader.write_store(tmp_path_factory.mktemp("hostile") / name, recs), progress=False)


# -- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """8 recordings, 6-channel IMU at 200 Hz, 277 windows of 1 s every 0.25 s."""
    ds = _imu_dataset(tmp_path_factory, "plain", 11, [1600 + 90 * r for r in range(8)], splits=True)
    return ds.windows(sec=1.0, stride=0.25, modalities=["imu"])


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    """Recordings with a gap (masked windows), one at 100 Hz (resampled), a second 3-channel stream at 50 Hz,
    text (a list of narrations per window) and labels: every kind of per-window value and every read path."""
    import mmloader

    rng = np.random.default_rng(5)
    recs = []
    for r in range(8):
        hz = 100.0 if r == 5 else 200.0
        t, ts = _series(r, int(hz * (6 + r % 3)), hz, 6, rng, gap_at=int(hz * 3) if r == 3 else None)
        _, ts2 = _series(r, int(50 * (6 + r % 3)), 50.0, 3, rng)
        t0 = int(t[0])
        events = {"activities": [(t0 + k * 2000 * MS, t0 + (k + 1) * 2000 * MS, ["walk", "run", "sit"][(k + r) % 3])
                                 for k in range(5)],
                  "narration": [(t0 + k * 400 * MS, t0 + k * 400 * MS + 100 * MS, f"n{r}.{k}") for k in range(22)]}
        recs.append(mmloader.Recording(id=f"r{r}", split="train" if r % 3 else "val",
                                       timeseries={"imu": ts, "gyro2": ts2}, events=events))
    store = mmloader.write_store(tmp_path_factory.mktemp("hostile") / "rich", recs)
    ws = mmloader.open(store, progress=False).windows(
        sec=1.0, stride=0.25, modalities=["imu", "gyro2", "text"], label_stream="activities",
        text_stream="narration", max_masked_fraction=0.6)
    b = ws.read_batch(list(range(len(ws))))
    assert not bool(b["imu_mask"].all()), "the fixture should hold masked (gap) windows"
    assert set(b) >= {"imu", "imu_mask", "gyro2", "gyro2_mask", "text", "label"}
    return ws


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """r0..r5 with a 6-channel IMU, r6 and r7 with a 3-channel one: batches mixing them cannot be stacked."""
    ds = _imu_dataset(tmp_path_factory, "mixed", 3, [1200 + 50 * r for r in range(8)],
                      channels=[3 if r >= 6 else 6 for r in range(8)])
    return ds.windows(sec=1.0, stride=0.5, modalities=["imu"])


# -- wrappers (module level: workers unpickle them) ----------------------------------------------------------------


class Arranged:
    """Window ``i`` of this set is window ``mapping[i]`` of ``ws`` (its fields included): lets a test choose which
    windows a shuffled loader puts together in a batch."""

    def __init__(self, ws, mapping):
        self.ws, self.mapping = ws, np.asarray(mapping, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.mapping)

    def __getitem__(self, i: int) -> dict:
        return self.ws[int(self.mapping[int(i)])]

    def affinity(self, indices):
        return self.ws.affinity(self.mapping[np.asarray(indices, dtype=np.int64)])

    def index_fields(self, i: int) -> dict:
        return self.ws.index_fields(int(self.mapping[int(i)]))

    def read_batch(self, indices, alloc=None, rows=None, size=None):
        return self.ws.read_batch(self.mapping[np.asarray(indices, dtype=np.int64)].tolist(), alloc=alloc, rows=rows,
                                  size=size)


class NoAffinity(Wrapped):
    """The same set without ``affinity``: its shuffled batches are read whole, as before the split."""

    affinity = None  # type: ignore[assignment]


class ShortAffinity(Wrapped):
    """A set whose ``affinity`` is wrong: one key short (a user's bug in a new protocol method)."""

    def affinity(self, indices):
        return self.ws.affinity(indices)[:-1]


class WindowByWindow(Wrapped):
    """A set that has ``affinity`` but reads window by window (``read_batch`` → None, as a set with video does):
    each part is collated on its own by its worker."""

    def read_batch(self, indices, alloc=None, rows=None, size=None):
        return None


# -- equality with num_workers=0 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [2, 3])
def test_rich_set_is_bit_identical_to_no_workers(rich, workers):
    """Masked windows, a resampled recording, two streams, text lists and labels; a batch size that leaves a
    short last batch; two epochs through the same (persistent) pool."""
    kw = dict(batch_size=10, shuffle=True, seed=7)
    ref_loader = WindowLoader(rich, num_workers=0, **kw)
    want = [_frozen(list(ref_loader)) for _ in range(2)]
    assert len(rich) % 10, "the last batch should be short"
    loader = WindowLoader(rich, num_workers=workers, **kw)
    try:
        for epoch in range(2):
            assert_batches(list(loader), want[epoch], f"epoch {epoch}")
        assert _split_was_used(loader)
    finally:
        loader.close()
    assert _leftovers() == []


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5, 64, 1000])
def test_every_batch_size_including_tiny_last_batches(plain, batch_size):
    """Batches of one window (never split), of 2 and 3 (split only when even enough), a last batch of one or two
    windows, one batch holding the whole set."""
    kw = dict(batch_size=batch_size, shuffle=True, seed=batch_size)
    (got,), _ = run(plain, 2, **kw)
    assert_batches(got, reference(plain, **kw), f"batch_size={batch_size}")
    assert _leftovers() == []


def test_last_batch_of_one_and_of_two_windows(plain):
    n = len(plain)
    for last in (1, 2, 3):
        sub = plain.filter(np.arange(n) < (n // 16) * 16 + last - 16)  # k*16 + last windows
        assert len(sub) % 16 == last
        kw = dict(batch_size=16, shuffle=True, seed=last)
        (got,), used = run(sub, 2, **kw)
        assert used
        assert_batches(got, reference(sub, **kw), f"last={last}")
        assert got[-1]["index"].numel() == last
    assert _leftovers() == []


def test_derived_sets(plain):
    rng = np.random.default_rng(0)
    derived = {
        "filter": plain.filter(rng.random(len(plain)) < 0.6),
        "split": plain.split("train"),
        "recordings": plain.recordings(["r1", "r2", "r5", "r6", "r7"]),
        "filter of split": plain.split("train").filter(np.arange(len(plain.split("train"))) % 3 != 1),
    }
    for name, ws in derived.items():
        kw = dict(batch_size=12, shuffle=True, seed=4)
        (got,), used = run(ws, 2, **kw)
        assert_batches(got, reference(ws, **kw), name)
        assert used, name
    assert _leftovers() == []


def test_window_cache_is_bit_identical_to_no_workers(plain, tmp_path):
    cached = plain.cache(url=str(tmp_path / "cache"), fill="eager", progress=False, shard_size=16)
    kw = dict(batch_size=24, shuffle=True, seed=9)
    want = reference(plain, **kw)
    assert_batches(reference(cached, **kw), want, "cache, 0 workers")
    loader = WindowLoader(cached, num_workers=2, **kw)
    try:
        assert_batches(list(loader), want, "cache, 2 workers")
        assert _split_was_used(loader)
    finally:
        loader.close()
    assert _leftovers() == []


def test_lazy_window_cache_filled_by_the_workers(plain, tmp_path):
    cached = plain.cache(url=str(tmp_path / "lazy"), fill="lazy", progress=False, shard_size=32)
    kw = dict(batch_size=20, shuffle=True, seed=2)
    (first, second), _ = run(cached, 2, epochs=2, **kw)
    want = reference(plain, **kw)
    assert_batches(first, want, "lazy cache, filling")
    loader0 = WindowLoader(plain, num_workers=0, **kw)
    list(loader0)
    assert_batches(second, _frozen(list(loader0)), "lazy cache, filled")
    assert _leftovers() == []


def test_rank_and_world_size(plain):
    for rank in range(3):
        kw = dict(batch_size=8, shuffle=True, seed=1, rank=rank, world_size=3, even_shards=rank == 1)
        (got,), _ = run(plain, 2, **kw)
        assert_batches(got, reference(plain, **kw), f"rank {rank}")
    assert _leftovers() == []


def test_set_epoch_and_several_epochs(plain):
    kw = dict(batch_size=16, shuffle=True, seed=123)
    ref = WindowLoader(plain, num_workers=0, **kw)
    loader = WindowLoader(plain, num_workers=2, **kw)
    try:
        for epoch in (0, 1, 5, 2, 2):
            ref.set_epoch(epoch)
            loader.set_epoch(epoch)
            assert_batches(list(loader), _frozen(list(ref)), f"epoch {epoch}")
        assert loader.epoch == 3
        pool = loader._pool
        assert pool is not None and pool.shared is not None
        made, slots = pool.shared._made, pool.shared.max_slots
    finally:
        loader.close()
    assert 1 <= made <= slots
    assert _leftovers() == []


def test_no_persistent_workers_prefetch_and_fork(plain):
    kw = dict(batch_size=16, shuffle=True, seed=8)
    ref = WindowLoader(plain, num_workers=0, **kw)
    want = [_frozen(list(ref)) for _ in range(2)]
    for extra in (dict(persistent_workers=False), dict(prefetch=1), dict(prefetch=5),
                  dict(multiprocessing_context="fork")):
        got, _ = run(plain, 2, epochs=2, **kw, **extra)
        for epoch in range(2):
            assert_batches(got[epoch], want[epoch], f"{extra} epoch {epoch}")
    assert _leftovers() == []


def test_two_loaders_interleaved(plain):
    kw_a, kw_b = dict(batch_size=16, shuffle=True, seed=1), dict(batch_size=9, shuffle=True, seed=2)
    want_a, want_b = reference(plain, **kw_a), reference(plain, **kw_b)
    a = WindowLoader(plain, num_workers=2, **kw_a)
    b = WindowLoader(plain, num_workers=2, **kw_b)
    got_a, got_b = [], []
    try:
        ia, ib = iter(a), iter(b)
        while True:
            xa, xb = next(ia, None), next(ib, None)
            if xa is None and xb is None:
                break
            if xa is not None:
                got_a.append(xa)
            if xb is not None:
                got_b.append(xb)
    finally:
        a.close()
        b.close()
    assert_batches(got_a, want_a, "a")
    assert_batches(got_b, want_b, "b")
    assert _leftovers() == []


def test_a_set_read_window_by_window_is_split_and_identical(rich):
    kw = dict(batch_size=9, shuffle=True, seed=12)
    want = reference(rich, **kw)
    ws = WindowByWindow(rich)
    assert_batches(reference(ws, **kw), want, "window by window, 0 workers")
    (got,), used = run(ws, 2, **kw)
    assert used
    assert_batches(got, want, "window by window, 2 workers")
    assert _leftovers() == []


@pytest.mark.parametrize("shuffle", [False, "block"])
def test_unshuffled_and_block_orders_are_unchanged(plain, shuffle):
    """The pool of a set with ``affinity`` has shared slots whatever the order; only ``shuffle=True`` splits."""
    kw = dict(batch_size=10, shuffle=shuffle, seed=3, block_windows=32, buffer_blocks=2)
    (got, again), used = run(plain, 2, epochs=2, **kw)
    ref = WindowLoader(plain, num_workers=0, **kw)
    assert_batches(got, _frozen(list(ref)), f"shuffle={shuffle!r}")
    assert_batches(again, _frozen(list(ref)), f"shuffle={shuffle!r}, epoch 1")
    assert not used
    assert _leftovers() == []


# -- resume ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_after", [1, 3, 11])
def test_resume_mid_epoch_is_exact(plain, stop_after):
    kw = dict(batch_size=16, shuffle=True, seed=31)
    ref = WindowLoader(plain, num_workers=0, **kw)
    want = _frozen(list(ref)) + _frozen(list(ref))  # epochs 0 and 1
    per_epoch = len(want) // 2
    loader = WindowLoader(plain, num_workers=2, **kw)
    got = []
    got.extend(list(loader))  # epoch 0 done: resume inside epoch 1
    for b in loader:
        got.append(b)
        if len(got) == per_epoch + stop_after:
            break
    state = loader.state_dict()
    loader.close()
    assert state["epoch"] == 1 and state["offset"] == 16 * stop_after
    for workers in (2, 0, 3):
        again = WindowLoader(plain, num_workers=workers, **kw)
        again.load_state_dict(state)
        try:
            rest = list(again)
        finally:
            again.close()
        assert_batches(got + rest, want, f"resumed with {workers} workers")
    # the same loader, iterated again after the break, continues where it stopped
    loader2 = WindowLoader(plain, num_workers=2, **kw)
    loader2.load_state_dict(state)
    first = []
    for b in loader2:
        first.append(b)
        break
    rest = list(loader2)
    loader2.close()
    assert_batches(got + first + rest, want, "break, then iterate again")
    assert _leftovers() == []


# -- memory: slots reused, held batches never change ---------------------------------------------------------------


def test_held_batches_never_change_even_with_more_batches_than_slots(rich):
    kw = dict(batch_size=4, shuffle=True, seed=17)
    ref = WindowLoader(rich, num_workers=0, **kw)
    want = [_frozen(list(ref)) for _ in range(3)]
    loader = WindowLoader(rich, num_workers=2, **kw)
    try:
        held = list(loader)  # every batch of the epoch held at once
        pool = loader._pool
        # more batches than shared slots and the workers' own slots together: some come back pickled
        assert len(held) > pool.shared.max_slots + 2 * pool.slots, (len(held), pool.shared.max_slots, pool.slots)
        assert_batches(held, want[0], "held, right after the epoch")
        # a second epoch while the first is still held: no slot of a held batch may be written
        second = list(loader)
        assert_batches(held, want[0], "held epoch 0 after epoch 1")
        assert_batches(second, want[1], "epoch 1")
        # keep only some tensors (views, slices, numpy arrays) of epoch 1; drop the rest, then read epoch 2
        parts = [(b["imu"][1:3], b["imu_mask"].numpy(), b["gyro2"]) for b in second]
        del second
        gc.collect()
        third = list(loader)
        assert_batches(third, want[2], "epoch 2")
        for k, (imu, mask, gyro) in enumerate(parts):
            assert torch.equal(bits(imu), bits(want[1][k]["imu"][1:3])), k
            assert np.array_equal(mask, want[1][k]["imu_mask"].numpy()), k
            assert torch.equal(bits(gyro), bits(want[1][k]["gyro2"])), k
        assert pool.shared._made <= pool.shared.max_slots
    finally:
        loader.close()
    # the pool is gone; its files too; what is held still reads the same
    assert _leftovers() == []
    assert_batches(held, want[0], "held epoch 0 after close")
    assert_batches(third, want[2], "held epoch 2 after close")


def test_slots_are_reused_not_leaked(plain):
    """Over epochs the slots are reused: never more than ``max_slots`` made, none remade (all batches but the last
    have one size), none left unacknowledged, and all free again once the batches are dropped. (How many are made
    varies with timing: epoch 0 needs fewer, its first batches come back whole before the layout is known.)"""
    kw = dict(batch_size=32, shuffle=True, seed=3)
    loader = WindowLoader(plain, num_workers=2, **kw)

    def consume() -> None:
        for b in loader:
            assert b["imu"].shape[1:] == (6, 200)

    made = []
    try:
        for epoch in range(6):
            consume()
            gc.collect()
            pool = loader._pool
            shared = pool.shared
            assert shared is not None and pool.layout is not None
            made.append(shared._made)
            assert sorted(shared.free) == list(range(shared._made)), "a slot not given back after its batch went"
            assert max(shared._gen.values()) == 0, "a slot was remade"
            assert shared._acks == {} and shared._paths == {}, "slot files left unacknowledged"
        assert made == sorted(made) and made[-1] <= shared.max_slots, made
    finally:
        loader.close()
    assert _leftovers() == []


def test_a_batch_modified_in_place_does_not_leak_into_the_next(plain):
    """Users normalise batches in place: a reused slot must be written whole by the next batch."""
    kw = dict(batch_size=16, shuffle=True, seed=5)
    want = reference(plain, **kw)
    loader = WindowLoader(plain, num_workers=2, **kw)
    got = []
    try:
        for b in loader:
            got.append(_frozen([b])[0])
            b["imu"].fill_(float("nan"))
            b["imu_mask"].fill_(False)
            del b
    finally:
        loader.close()
    assert_batches(got, want, "after in-place writes")


@pytest.fixture(scope="module")
def long(tmp_path_factory):
    """8 recordings of 50 s: a batch of 240 one-second windows (1.2 MB) needs a slot of 2 MiB, one of 20 a slot of
    1 MiB, too small for the others."""
    ws = _imu_dataset(tmp_path_factory, "long", 8, [10000] * 8).windows(sec=1.0, stride=0.25, modalities=["imu"])
    assert len(ws) >= 6 * 240 + 20
    return ws.filter(np.arange(len(ws)) < 6 * 240 + 20)


def test_a_slot_grown_for_a_larger_batch_while_others_are_held(long):
    """Epoch 0 held whole: its short last batch gets a small new slot. Only that batch is dropped: epoch 1's first
    split batch finds no free slot big enough but that one, which is remade larger (a new generation every worker
    maps in place of the old); every batch of both epochs stays as 0 workers read it."""
    kw = dict(batch_size=240, shuffle=True, seed=1)
    ref = WindowLoader(long, num_workers=0, **kw)
    want = [_frozen(list(ref)) for _ in range(2)]
    assert want[0][-1]["index"].numel() == 20
    loader = WindowLoader(long, num_workers=2, **kw)
    try:
        held = list(loader)
        shared = loader._pool.shared
        sizes = {s: len(mm) for s, mm in shared._maps.items()}
        assert sorted(set(sizes.values())) == [1 << 20, 2 << 20], sizes  # the short batch has a small slot
        small = held.pop()
        del small
        gc.collect()
        second = list(loader)
        assert max(shared._gen.values()) >= 1, "no slot was grown: the test does not test what it says"
        assert_batches(held, want[0][:-1], "epoch 0, held")
        assert_batches(second, want[1], "epoch 1")
        del second
        gc.collect()
        third = list(loader)
        ref_third = _frozen(list(ref))
        assert_batches(third, ref_third, "epoch 2")
        assert_batches(held, want[0][:-1], "epoch 0, still held")
    finally:
        loader.close()
    assert _leftovers() == []


def test_a_set_without_big_arrays_is_not_split_but_still_identical(rich):
    """Text only: no tensor of two dimensions, so no layout; the first batches were split all the same."""
    import mmloader

    ws = mmloader.open(rich.store.url, progress=False).windows(
        sec=1.0, stride=0.25, modalities=["text"], label_stream="activities", text_stream="narration")
    kw = dict(batch_size=7, shuffle=True, seed=2)
    (got, again), _ = run(ws, 2, epochs=2, **kw)
    ref = WindowLoader(ws, num_workers=0, **kw)
    assert_batches(got, _frozen(list(ref)), "text only, epoch 0")
    assert_batches(again, _frozen(list(ref)), "text only, epoch 1")
    assert _leftovers() == []


# -- errors -------------------------------------------------------------------------------------------------------


def _first_error(windows, workers: int, **kw) -> tuple[list[dict], BaseException]:
    loader = WindowLoader(windows, num_workers=workers, **kw)
    seen = []
    try:
        with pytest.raises(Exception) as info:
            for b in loader:
                seen.append(_frozen([b])[0])
    finally:
        loader.close()
    return seen, info.value


@pytest.mark.parametrize("batch_size,seed", [(8, 0), (8, 1), (16, 2), (3, 3)])
def test_unstackable_channels_fail_the_same_way(mixed, batch_size, seed):
    kw = dict(batch_size=batch_size, shuffle=True, seed=seed)
    seen0, err0 = _first_error(mixed, 0, **kw)
    assert isinstance(err0, ValueError)
    for workers in (2, 3):
        seen, err = _first_error(mixed, workers, **kw)
        assert type(err) is type(err0), (workers, repr(err))
        assert "stack" in str(err), str(err)
        assert_batches(seen, seen0, f"{workers} workers before the error")
        assert _leftovers() == []


def _arranged_mixed(mixed) -> tuple[Arranged, list[str]]:
    """Batches of two windows, in this order: 6 of 6-channel windows (split: r0 + r1), 2 of 3-channel windows
    (split: r6 + r7, after the layout learnt 6 channels), one of two r6 windows (read whole), one 6-channel
    (r2 + r3), one that mixes r0 (6) and r7 (3): cannot be stacked; then two more."""
    rid = np.asarray(mixed.index["recording_id"].to_pylist())
    of = {r: list(np.flatnonzero(rid == r)) for r in set(rid.tolist())}
    pairs = [(of["r0"][k], of["r1"][k]) for k in range(6)] + [(of["r6"][k], of["r7"][k]) for k in range(2)] + \
            [(of["r6"][5], of["r6"][6]), (of["r2"][0], of["r3"][0]), (of["r0"][8], of["r7"][8]),
             (of["r4"][0], of["r5"][0]), (of["r4"][1], of["r5"][1])]
    seq = [w for p in pairs for w in p]
    order = WindowLoader(Arranged(mixed, np.arange(len(seq))), batch_size=2, shuffle=True, seed=0).order(0)
    mapping = np.empty(len(seq), dtype=np.int64)
    mapping[order] = seq
    kinds = ["6"] * 6 + ["3"] * 3 + ["6", "mixed", "6", "6"]
    return Arranged(mixed, mapping), kinds


def test_homogeneous_batches_of_another_width_after_the_layout_is_known(mixed):
    arranged, kinds = _arranged_mixed(mixed)
    kw = dict(batch_size=2, shuffle=True, seed=0)
    seen0, err0 = _first_error(arranged, 0, **kw)
    assert isinstance(err0, ValueError) and len(seen0) == kinds.index("mixed")
    assert [tuple(b["imu"].shape[1:]) for b in seen0] == [(6, 200)] * 6 + [(3, 200)] * 3 + [(6, 200)]
    for workers in (2, 3):
        seen, err = _first_error(arranged, workers, **kw)
        assert type(err) is ValueError, repr(err)
        assert_batches(seen, seen0, f"{workers} workers")
    assert _leftovers() == []


@pytest.mark.parametrize("batch", [0, 1, 9])
def test_an_error_in_a_part_keeps_its_type_and_attributes(plain, batch):
    """Batch 0 and 1: parts sent back whole (layout not known yet); batch 9: parts written into a slot."""
    kw = dict(batch_size=16, shuffle=True, seed=5)
    order = WindowLoader(plain, **kw).order(0)
    bad = int(order[16 * batch + 7])
    seen0, err0 = _first_error(Wrapped(plain, bad=bad), 0, **kw)
    assert type(err0) is PartFailure and len(seen0) == batch
    for workers in (2, 3):
        seen, err = _first_error(Wrapped(plain, bad=bad), workers, **kw)
        assert type(err) is PartFailure, repr(err)
        assert str(err) == str(err0) and err.window == bad
        assert_batches(seen, seen0, f"{workers} workers")
        assert _leftovers() == []


def test_both_parts_of_a_batch_failing_raise_once_and_the_loader_recovers(plain):
    kw = dict(batch_size=16, shuffle=True, seed=6)
    order = WindowLoader(plain, **kw).order(0)
    batch = order[16 * 8: 16 * 9]
    keys = plain.affinity(batch) % 2
    bad = (int(batch[np.flatnonzero(keys == 0)[0]]), int(batch[np.flatnonzero(keys == 1)[0]]))  # one per part
    class_ = Wrapped(plain, bad=bad)
    seen, err = _first_error(class_, 2, **kw)
    assert type(err) is PartFailure and len(seen) == 8 and err.window in bad
    assert_batches(seen, reference(plain, **kw)[:8], "before the failure")
    # iterating again resumes at the failed batch: it fails again, the same way, with a fresh pool
    loader = WindowLoader(class_, num_workers=2, **kw)
    loader.load_state_dict({**loader.state_dict(), "offset": 16 * 8})
    with pytest.raises(PartFailure):
        list(loader)
    loader.close()
    # a healthy set resumed at the same place finishes the epoch like 0 workers
    ok = WindowLoader(plain, num_workers=2, **kw)
    ok.load_state_dict({**ok.state_dict(), "offset": 16 * 8})
    rest = list(ok)
    ok.close()
    assert_batches(rest, reference(plain, **kw)[8:], "after the failure")
    assert _leftovers() == []


# -- dead and stopped workers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("victim,after", [(0, 1), (1, 4)])
def test_a_worker_killed_mid_epoch_raises_naming_it_and_leaves_no_file(plain, victim, after):
    kw = dict(batch_size=8, shuffle=True, seed=13)
    want = reference(plain, **kw)
    loader = WindowLoader(plain, num_workers=2, **kw)
    it = iter(loader)
    got = [next(it) for _ in range(after)]
    pids = loader.worker_pids
    try:
        assert loader._pool.shared is not None
        os.kill(pids[victim], signal.SIGKILL)
        t = time.monotonic()
        with pytest.raises(WorkerError) as info:
            for b in it:
                got.append(b)
        assert time.monotonic() - t < 10
        msg = str(info.value)
        assert re.search(rf"loader worker {victim} \(pid {pids[victim]}\) killed by signal SIGKILL", msg), msg
        assert loader.worker_pids == []
        assert wait_gone(pids) == []
        assert _leftovers() == []
        assert_batches(got, want[:len(got)], "before the death")
    finally:
        kill_leftovers(pids)
        loader.close()
    # the loader starts a fresh pool and finishes the epoch from where it stopped
    rest = list(loader)
    loader.close()
    assert_batches(got + rest, want, "after the death")
    assert _leftovers() == []


@pytest.mark.parametrize("victim", [0, 1])
def test_a_stopped_worker_raises_after_the_timeout_naming_it(plain, victim):
    kw = dict(batch_size=8, shuffle=True, seed=21)
    loader = WindowLoader(plain, num_workers=2, timeout=3, **kw)
    it = iter(loader)
    for _ in range(2):
        next(it)
    pids = loader.worker_pids
    try:
        assert loader._pool.shared is not None and loader._pool.layout is not None
        os.kill(pids[victim], signal.SIGSTOP)
        t = time.monotonic()
        with pytest.raises(WorkerError) as info:
            for _ in it:
                pass
        took = time.monotonic() - t
        msg = str(info.value)
        assert took < 12, took
        assert re.search(rf"loader worker {victim} \(pid {pids[victim]}, stopped\) has not handed back batch \d+",
                         msg), msg
        assert "(timeout=3)" in msg and "the pool was stopped" in msg
        assert loader.worker_pids == []
        assert wait_gone(pids) == []
    finally:
        kill_leftovers(pids)
        loader.close()
    assert _leftovers() == []


def test_timeout_does_not_fire_on_a_healthy_split_epoch(plain):
    kw = dict(batch_size=16, shuffle=True, seed=4)
    (got,), _ = run(plain, 2, timeout=5, **kw)
    assert_batches(got, reference(plain, **kw), "timeout=5")


def test_a_worker_killed_between_epochs_is_replaced(plain):
    kw = dict(batch_size=16, shuffle=True, seed=10)
    ref = WindowLoader(plain, num_workers=0, **kw)
    want = [_frozen(list(ref)) for _ in range(2)]
    loader = WindowLoader(plain, num_workers=2, **kw)
    pids: list[int] = []
    try:
        first = list(loader)
        pids = loader.worker_pids
        os.kill(pids[1], signal.SIGKILL)
        loader._pool.procs[1].join(5)  # its death is known before the next epoch (else that epoch raises it)
        assert loader._pool.procs[1].exitcode == -signal.SIGKILL
        second = list(loader)
        assert loader.worker_pids and loader.worker_pids != pids
    finally:
        kill_leftovers(pids)
        loader.close()
    assert_batches(first, want[0], "epoch 0")
    assert_batches(second, want[1], "epoch 1, fresh pool")
    assert _leftovers() == []


@pytest.mark.parametrize("how", ["SIGSTOP", "SIGKILL"])
def test_a_worker_lost_before_the_first_batch(plain, how):
    """While the first parts are still sent back whole (no layout, no slot yet)."""
    kw = dict(batch_size=8, shuffle=True, seed=22)
    loader = WindowLoader(plain, num_workers=2, timeout=3, **kw)
    pool = loader._get_pool()
    pids = loader.worker_pids
    try:
        os.kill(pids[0], getattr(signal, how))
        t = time.monotonic()
        with pytest.raises(WorkerError) as info:
            list(loader)
        assert time.monotonic() - t < 12
        msg = str(info.value)
        if how == "SIGSTOP":
            assert re.search(rf"loader worker 0 \(pid {pids[0]}, stopped\) has not handed back batch 0 ", msg), msg
        else:
            assert re.search(rf"loader worker 0 \(pid {pids[0]}\) killed by signal SIGKILL", msg), msg
        assert pool.layout is None
        assert loader.worker_pids == []
        assert wait_gone(pids) == []
    finally:
        kill_leftovers(pids)
        loader.close()
    assert _leftovers() == []


# -- the helpers on their own ----------------------------------------------------------------------------------------


def test_split_is_deterministic_covers_every_position_and_respects_the_bound():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, workers = int(rng.integers(1, 40)), int(rng.integers(2, 5))
        keys = rng.integers(0, 9, size=n)
        parts = sb.split(keys, workers)
        again = sb.split(keys.copy(), workers)
        if parts is None:
            assert again is None
            continue
        assert all(np.array_equal(a, b) for a, b in zip(parts, again))
        assert sorted(np.concatenate(parts).tolist()) == list(range(n))
        assert max(len(p) for p in parts) <= sb.MAX_IMBALANCE * n / workers
        for i, p in enumerate(parts):
            assert np.all(keys[p] % workers == i)
            assert np.all(np.diff(p) > 0)


def test_merge_of_many_parts_in_any_order_equals_the_batch():
    g = torch.Generator().manual_seed(1)
    n = 11
    batch = {"ids": [f"r{i % 4}" for i in range(n)], "t0": torch.arange(n, dtype=torch.float64) / 7,
             "x": torch.randn(n, 3, 4, generator=g), "m": torch.rand(n, 4, generator=g) > 0.3,
             "text": [[f"w{i}", "x"] if i % 2 else [] for i in range(n)], "index": torch.arange(n) * 3}
    layout = sb.Layout.from_batch(batch)
    tag = f"test-sbh-{os.getpid()}"
    slots, writer = sb.SharedSlots(tag, workers=1, max_slots=1), sb.PartWriter()
    try:
        placed, nbytes = layout.place(n)
        slot, gen, path = slots.take(nbytes)
        writer.map(slot, gen, path)
        slots.acked(slot, gen)
        positions = [np.array([1, 4, 9]), np.array([0, 2, 3, 10]), np.array([5, 6, 7, 8])]
        got = []
        for pos in reversed(positions):
            part = {k: ([v[int(p)] for p in pos] if isinstance(v, list) else v[torch.from_numpy(pos)])
                    for k, v in batch.items()}
            got.append((pos, writer.write(part, pos, n, slot, gen, placed)))
        got.sort(key=lambda x: int(x[0][0]))
        out = sb.merge(got, n, slots.views(slot, placed))
        assert_same(out, batch)
        assert slots.take(nbytes) is None  # the only slot is held by ``out``
        del out
        gc.collect()
        assert slots.take(nbytes) == (slot, gen, None)  # reused, same generation
    finally:
        writer.close()
        slots.close()
    assert not [n for n in os.listdir(shm.SHM_DIR) if n.startswith(f"mmloader-{tag}")]


# -- known defects (last, so that -x runs everything above first) ---------------------------------------------------


def test_slots_freed_from_another_thread_while_one_is_taken():
    """``SharedSlots.free`` is appended to by finalizers, in whichever thread drops a batch's last reference (its
    docstring: "any thread"); ``take`` must not fail when that happens while it looks for a free slot. (A loader
    iterated in a prefetching thread while the training thread drops the batches.)"""
    import queue
    import sys
    import threading

    layout = sb.Layout((("x", (16,), "float32"),))
    placed, nbytes = layout.place(4)
    slots = sb.SharedSlots(f"test-sbr-{os.getpid()}", workers=1, max_slots=12)
    handed: queue.Queue = queue.Queue()
    stop = threading.Event()

    def drop() -> None:
        while not stop.is_set():
            try:
                batch = handed.get(timeout=0.05)
            except queue.Empty:
                continue
            del batch  # the last reference: the finalizer runs in this thread

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=drop, daemon=True)
    thread.start()
    taken = 0
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            got = slots.take(nbytes)
            if got is None:
                continue
            slot, gen, path = got
            if path is not None:
                slots.acked(slot, gen)
            handed.put(slots.views(slot, placed))
            taken += 1
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        thread.join()
        slots.close()
    assert taken > 100


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """~96,000 windows of 50 ms (8 recordings of 60 s, a window every 5 ms)."""
    ds = _imu_dataset(tmp_path_factory, "big", 1, [12000] * 8, prefix="rec")
    return ds.windows(sec=0.05, stride=0.005, modalities=["imu"])


@pytest.mark.parametrize("batch_size,prefetch,workers", [(4096, 2, 2), (2048, 4, 2), (3072, 2, 3)])
def test_large_batches_do_not_deadlock_the_task_and_result_pipes(big, batch_size, prefetch, workers):
    """Each part's task carries its window indices (a list) and batch positions (int64): ~11 B a window, and up to
    ``prefetch * workers`` parts are queued per worker — ~66 KB for batches of 4096 at the defaults, more than a
    pipe holds (64 KiB). Before the fix (a thread in each worker drains its task pipe: ``loader._Inbox``) the main
    process blocked in ``_send`` writing a worker's task pipe while that worker blocked writing its answer (the
    first parts come back whole: ~0.5 MB) into a result pipe the main process was not reading: a deadlock; without
    ``timeout`` the loop hung for ever, with one a healthy worker was killed. Read whole, the same batches."""
    kw = dict(batch_size=batch_size, shuffle=True, seed=0)
    want = [b["index"].tolist() for b in WindowLoader(big, num_workers=0, **kw)]
    whole = WindowLoader(NoAffinity(big), num_workers=workers, prefetch=prefetch, timeout=8, **kw)
    try:
        assert [b["index"].tolist() for b in whole] == want  # the same batches, read whole: fine
    finally:
        whole.close()
    loader = WindowLoader(big, num_workers=workers, prefetch=prefetch, timeout=8, **kw)  # no timeout: a hang
    try:
        got = [b["index"].tolist() for b in loader]
    finally:
        loader.close()
    assert got == want
    assert _leftovers() == []


def test_perf_a_derived_set_of_every_other_recording_is_still_split(plain, tmp_path):
    """``WindowSet.affinity`` is the recording's rank among the set's own recordings. (It was the code in the *base*
    set's dictionary: ``recordings(["r0", "r2", "r4", "r6"])`` had only even keys, so with 2 workers every batch was
    lopsided, read whole by either worker, and both workers opened every recording.)"""
    sub = plain.recordings(["r0", "r2", "r4", "r6"])
    kw = dict(batch_size=24, shuffle=True, seed=3, drop_last=True)
    (got,), _ = run(Wrapped(sub, log_dir=tmp_path), 2, **kw)
    assert_batches(got, reference(sub, **kw), "every other recording")
    read: dict[str, set] = {}
    for log in tmp_path.glob("*.log"):
        read[log.stem] = {r for line in log.read_text().splitlines() for r in line.split()[1:]}
    assert len(read) == 2, read
    a, b = read.values()
    assert not (a & b), f"recordings read by both workers: {sorted(a & b)}"


@pytest.mark.parametrize("mode", ["split", "whole"])
def test_read_ahead_is_bounded_for_a_slow_consumer(plain, tmp_path, mode):
    """A training step slower than reading (the usual case): the loader should read at most about ``prefetch``
    batches per worker ahead of the consumer. ``_dispatch`` (shuffle=True) bounded only the batches *in flight*, not
    those already back and waiting in ``run``'s buffer, so each batch consumed let ``prefetch * workers`` more be
    read: the read-ahead grew with the epoch, all of it held in memory (past the slots, pickled). It predated the
    split (``mode="whole"``: a set without affinity)."""
    ws = Wrapped(plain, log_dir=tmp_path) if mode == "split" else NoAffinity(plain, log_dir=tmp_path)
    loader = WindowLoader(ws, batch_size=4, shuffle=True, seed=1, num_workers=2, prefetch=2)
    consumed = 0
    try:
        for _ in loader:
            consumed += 1
            time.sleep(0.05)  # the training step
            if consumed == 24:
                break
    finally:
        loader.close()
    read = sum(int(line.split()[0]) for log in tmp_path.glob("*.log") for line in log.read_text().splitlines())
    ahead = read / 4 - consumed
    assert ahead <= 2 * 2 + 2, f"{read} windows read ({read / 4:g} batches) while {consumed} were consumed"


def test_an_affinity_of_the_wrong_length_is_an_error_not_a_corrupt_batch(plain):
    """``affinity(indices)`` must give one key per window: one key short, the last window of every split batch was
    read by nobody and ``merge`` left its row as it found it — ``None`` in the lists, uninitialised memory in
    ``index``/``t0``/``t1``, the slot's previous contents in the big arrays — and the loader yielded it."""
    kw = dict(batch_size=16, shuffle=True, seed=0)
    want = reference(plain, **kw)
    loader = WindowLoader(ShortAffinity(plain), num_workers=2, **kw)
    try:
        with pytest.raises((ValueError, TypeError), match="affinity"):
            got = list(loader)
            assert_batches(got, want, "affinity one key short")  # (if it does not raise, at least no corruption)
    finally:
        loader.close()
    assert _leftovers() == []
