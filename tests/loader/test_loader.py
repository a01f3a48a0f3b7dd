"""The loader: deterministic order, exact resume with any num_workers, disjoint shards across ranks."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mmloader
from mmloader.errors import MediaError


@pytest.fixture(scope="module")
def windows(sample_store):
    ds = mmloader.open(sample_store(videos=3, seconds=16, seed=2, defect_fraction=0.0))
    return ds.windows(sec=1, stride=0.5, modalities=["imu", "video"], frames=1, size=(32, 40))


def _indices(batches):
    return [b["index"].tolist() for b in batches]


def test_batches_have_the_documented_shapes(windows):
    batch = next(iter(windows.loader(batch_size=4)))
    assert batch["imu"].shape == (4, 6, 200) and batch["imu"].dtype == torch.float32
    assert batch["imu_mask"].shape == (4, 200) and batch["imu_mask"].dtype == torch.bool
    assert batch["video"].shape == (4, 1, 3, 32, 40) and batch["video"].dtype == torch.uint8
    assert batch["video_t"].shape == (4, 1)
    assert batch["t0"].dtype == torch.float64 and len(batch["recording_id"]) == 4


def test_order_is_a_function_of_seed_and_epoch(windows):
    a = windows.loader(batch_size=5, shuffle=True, seed=7)
    b = windows.loader(batch_size=5, shuffle=True, seed=7)
    assert np.array_equal(a.order(0), b.order(0)) and np.array_equal(a.order(3), b.order(3))
    assert not np.array_equal(a.order(0), a.order(1))
    assert sorted(a.order(0)) == list(range(len(windows)))
    e0 = _indices(a)
    e1 = _indices(a)  # the next epoch: a different permutation
    assert sorted(sum(e0, [])) == sorted(sum(e1, [])) == list(range(len(windows)))
    assert e0 != e1 and a.epoch == 2


def _three_batches_then_state(loader):
    """The indices of the first 3 batches of ``loader`` (then stopped) and its state_dict at that point."""
    head = []
    for k, batch in enumerate(loader):
        head.append(batch["index"].tolist())
        if k == 2:
            break
    return head, loader.state_dict()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_sample_exact(windows, workers):
    full = _indices(windows.loader(batch_size=3, shuffle=True, seed=11, num_workers=workers))
    head, state = _three_batches_then_state(windows.loader(batch_size=3, shuffle=True, seed=11, num_workers=workers))
    assert state["epoch"] == 0 and state["offset"] == 9
    resumed = windows.loader(batch_size=3, shuffle=True, seed=11, num_workers=workers)
    resumed.load_state_dict(state)
    assert head + _indices(resumed) == full
    # the batches' content is the same too, not only the indices
    again = windows.loader(batch_size=3, shuffle=True, seed=11, num_workers=workers)
    again.load_state_dict(state)
    b = next(iter(again))
    assert torch.equal(b["imu"], torch.stack([windows[i]["imu"] for i in full[3]]))


def test_resume_across_the_epoch_boundary(windows):
    loader = windows.loader(batch_size=4, shuffle=True, seed=1)
    list(loader)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["offset"] == 0
    fresh = windows.loader(batch_size=4, shuffle=True, seed=1)
    fresh.set_epoch(1)
    assert _indices(loader) == _indices(fresh)


def test_state_from_another_setup_is_refused(windows):
    state = windows.loader(batch_size=4, shuffle=True, seed=1).state_dict()
    other = windows.loader(batch_size=4, shuffle=True, seed=2)
    with pytest.raises(ValueError, match="seed=1.*has 2"):
        other.load_state_dict(state)


def test_explicit_ranks_are_disjoint_and_cover_the_set(windows):
    seen = []
    for rank in range(2):
        loader = windows.loader(batch_size=4, shuffle=True, seed=3, rank=rank, world_size=2)
        seen.append(sum(_indices(loader), []))
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(len(windows)))
    assert abs(len(seen[0]) - len(seen[1])) <= 1


def _dist_worker(rank, world, init_file, windows, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        loader = windows.loader(batch_size=4, shuffle=True, seed=3)  # rank/world from torch.distributed
        mine = torch.tensor(sum(_indices(loader), []) + [-1] * (len(windows) - 0))[: len(windows)]
        gathered = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        if rank == 0:
            torch.save([g[g >= 0].tolist() for g in gathered], out)
    finally:
        dist.destroy_process_group()


def test_torch_distributed_ranks_are_disjoint(windows, tmp_path):
    out = tmp_path / "seen.pt"
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), windows, str(out)), nprocs=2, join=True)
    seen = torch.load(out)
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(len(windows)))


def test_reader_pool_stays_bounded(windows):
    windows.reader_capacity = 1
    windows._readers = None
    try:
        for i in range(len(windows)):
            windows[i]
            assert len(windows.readers) <= 1
    finally:
        windows.reader_capacity = 4
        windows._readers = None


@pytest.mark.parametrize("workers", [0, 2])
def test_reading_errors_surface_with_the_file_name(windows, workers):
    broken = windows.filter(np.arange(len(windows)) < 4)
    broken._columns.video_idx["video"][0] = np.array([10**6])  # a frame that does not exist
    with pytest.raises(MediaError, match=r"\.mp4: (decord|pyav) could not decode frame"):  # its own type, also from a worker
        list(broken.loader(batch_size=2, num_workers=workers))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_memory_stays_flat_over_many_epochs(windows):
    loader = windows.loader(batch_size=8, shuffle=True, seed=0)
    for _ in range(3):  # warm-up: decoders, chunk caches, allocator pools
        list(loader)
    before = _rss_mb()
    for _ in range(12):
        list(loader)
    growth = _rss_mb() - before
    assert growth < 25, f"resident memory grew by {growth:.1f} MB over 12 epochs"
    assert len(windows.readers) <= windows.reader_capacity


# -- arguments -----------------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (dict(batch_size="4"), TypeError, r"^batch_size must be an integer, got str '4'"),
    (dict(batch_size=2.5), TypeError, r"^batch_size must be an integer, got float 2\.5"),
    (dict(batch_size=4.0), TypeError, r"^batch_size must be an integer"),
    (dict(batch_size=True), TypeError, r"^batch_size must be an integer, got bool"),
    (dict(batch_size=None), TypeError, r"^batch_size must be an integer"),
    (dict(batch_size=0), ValueError, r"^batch_size must be >= 1, got 0"),
    (dict(batch_size=-3), ValueError, r"^batch_size must be >= 1, got -3"),
    (dict(num_workers=-1), ValueError, r"^num_workers must be >= 0 and <= 256, got -1"),
    (dict(num_workers=1000), ValueError, r"^num_workers must be >= 0 and <= 256, got 1000"),
    (dict(num_workers=1.0), TypeError, r"^num_workers must be an integer"),
    (dict(num_workers="2"), TypeError, r"^num_workers must be an integer"),
    (dict(prefetch=0), ValueError, r"^prefetch must be >= 1, got 0"),
    (dict(prefetch=-5), ValueError, r"^prefetch must be >= 1, got -5"),
    (dict(prefetch=0, num_workers=2), ValueError, r"^prefetch must be >= 1, got 0"),
    (dict(prefetch=1.5), TypeError, r"^prefetch must be an integer"),
    (dict(seed=-1, shuffle=True), ValueError, r"^seed must be >= 0 and <= 9223372036854775807, got -1"),
    (dict(seed=2**63), ValueError, r"^seed must be >= 0 and <= 9223372036854775807"),
    (dict(seed=1.5), TypeError, r"^seed must be an integer, got float"),
    (dict(seed="0"), TypeError, r"^seed must be an integer, got str"),
    (dict(seed=None), TypeError, r"^seed must be an integer, got NoneType"),
    (dict(rank=0), ValueError, r"^rank and world_size must be given together"),
    (dict(world_size=2), ValueError, r"^rank and world_size must be given together"),
    (dict(rank=2, world_size=2), ValueError, r"^rank must be < world_size \(2\), got 2"),
    (dict(rank=-1, world_size=2), ValueError, r"^rank must be >= 0, got -1"),
    (dict(rank=0, world_size=0), ValueError, r"^world_size must be >= 1, got 0"),
    (dict(rank=0.0, world_size=2), TypeError, r"^rank must be an integer, got float"),
    (dict(rank=0, world_size="2"), TypeError, r"^world_size must be an integer, got str"),
    (dict(rank=False, world_size=1), TypeError, r"^rank must be an integer, got bool"),
    (dict(timeout=0), ValueError, r"^timeout must be a finite number of seconds > 0 \(or None: wait forever\), got 0\.0"),
    (dict(timeout=-1.5), ValueError, r"^timeout must be a finite number of seconds > 0"),
    (dict(timeout=float("inf")), ValueError, r"^timeout must be a finite number of seconds > 0"),
    (dict(timeout=float("nan")), ValueError, r"^timeout must be a finite number of seconds > 0"),
    (dict(timeout="3"), TypeError, r"^timeout must be a number of seconds or None, got str"),
    (dict(timeout=True), TypeError, r"^timeout must be a number of seconds or None, got bool"),
    (dict(multiprocessing_context="bogus", num_workers=1), ValueError, r"^multiprocessing_context must be one of \["),
    (dict(multiprocessing_context="bogus"), ValueError, r"^multiprocessing_context must be one of"),
    (dict(multiprocessing_context=None), TypeError, r"^multiprocessing_context must be one of"),
    (dict(shuffle="False"), TypeError, r"^shuffle must be True or False, got str 'False'"),
    (dict(shuffle=1), TypeError, r"^shuffle must be True or False, got int"),
    (dict(drop_last=None), TypeError, r"^drop_last must be True or False"),
    (dict(even_shards=0), TypeError, r"^even_shards must be True or False"),
    (dict(pin_memory="yes"), TypeError, r"^pin_memory must be True or False"),
    (dict(persistent_workers=1), TypeError, r"^persistent_workers must be True or False"),
    (dict(collate_fn=None), TypeError, r"^collate_fn must be callable, got NoneType"),
]


@pytest.mark.parametrize("kw, error, message", BAD_ARGUMENTS, ids=[repr(kw) for kw, _, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_refused_naming_the_argument(kw, error, message):
    from mmloader.loader import WindowLoader

    with pytest.raises(error, match=message):
        WindowLoader(list(range(10)), **kw)


def test_bad_windows_are_refused():
    from mmloader.loader import WindowLoader

    with pytest.raises(TypeError, match=r"^windows must support len\(\) and indexing"):
        WindowLoader(42)


def test_bad_arguments_are_refused_through_windowset_loader(windows):
    with pytest.raises(TypeError, match=r"^batch_size must be an integer, got str"):
        windows.loader(batch_size="4")
    with pytest.raises(ValueError, match=r"^seed must be >= 0"):
        windows.loader(seed=-1, shuffle=True)
    with pytest.raises(ValueError, match=r"^timeout must be a finite number"):
        windows.loader(timeout=0)
    assert windows.loader(timeout=30, num_workers=1).timeout == 30.0


def test_numpy_integers_and_bools_are_accepted_as_plain_values(windows):
    from mmloader.loader import WindowLoader

    ld = WindowLoader(list(range(10)), batch_size=np.int64(4), seed=np.uint32(3), shuffle=np.bool_(True),
                      num_workers=np.int32(0), prefetch=np.int16(1), rank=np.int64(0), world_size=np.int8(1),
                      timeout=np.float32(2.5), drop_last=np.True_)
    state = ld.state_dict()
    assert [type(state[k]) for k in ("batch_size", "seed", "rank", "world_size")] == [int] * 4
    assert type(ld.shuffle) is bool and type(ld.timeout) is float and ld.timeout == 2.5
    assert ld.seed == 3 and ld.batch_size == 4 and len(ld) == 2
    # the largest seed works, and a huge batch_size is one batch of everything
    assert sorted(WindowLoader(list(range(10)), shuffle=True, seed=2**63 - 1).order(0).tolist()) == list(range(10))
    big = windows.loader(batch_size=10**12, num_workers=np.int64(0))
    assert len(big) == 1 and len(next(iter(big))["index"]) == len(windows)


def test_set_epoch_checks_its_argument():
    from mmloader.loader import WindowLoader

    ld = WindowLoader(list(range(10)))
    with pytest.raises(ValueError, match=r"^epoch must be >= 0, got -1"):
        ld.set_epoch(-1)
    with pytest.raises(TypeError, match=r"^epoch must be an integer"):
        ld.set_epoch(1.5)
    ld.set_epoch(np.int64(3))
    assert type(ld.epoch) is int and ld.epoch == 3


def test_a_timeout_does_not_disturb_a_healthy_pass(windows):
    expected = _indices(windows.loader(batch_size=3, shuffle=True, seed=4))
    loader = windows.loader(batch_size=3, shuffle=True, seed=4, num_workers=2, timeout=60)
    assert _indices(loader) == expected
    loader.close()


# -- index order with workers: contiguous runs per worker -----------------------------------------------

def _collate_with_pid(samples):
    from mmloader.windows.collate import collate

    return {**collate(samples), "pid": os.getpid()}


def test_runs_are_dealt_to_the_workers_in_turn():
    from mmloader.loader import SAME_RUN, _WorkerPool

    pool = object.__new__(_WorkerPool)
    pool.procs = [None, None]
    batches = [[3 * k, 3 * k + 1, 3 * k + 2] for k in range(7)]
    queues = pool._tasks(batches, 2)
    assert [[k for k, _, _ in q] for q in queues] == [[0, 1, 4, 5], [2, 3, 6]]
    # the run goes with its first batch only; the others say it goes on (a 2048-window list per task cost more
    # than the task)
    assert all(run == sum(batches[k: k + 2], []) if k % 2 == 0 else run == SAME_RUN for q in queues for k, _, run in q)
    assert [t[2] for t in pool._tasks(batches, 0)] == [None] * 7  # shuffled: any worker, no run


def test_index_order_with_workers_reads_runs_and_resumes_exactly(windows):
    reference = list(windows.loader(batch_size=3))  # 0 workers: the whole pass is one announced run
    loader = windows.loader(batch_size=3, num_workers=2, collate_fn=_collate_with_pid)
    loader.run_batches = 2
    got = list(loader)
    assert _indices(got) == _indices(reference)
    for a, b in zip(got, reference):
        assert all(torch.equal(a[k], b[k]) for k in ("imu", "imu_mask", "video", "video_t"))
    pids = [b["pid"] for b in got]
    assert all(pids[k] == pids[k // 2 * 2] for k in range(len(pids)))  # a run is read by one worker
    assert all(pids[k] != pids[k - 2] for k in range(2, len(pids), 2))  # runs alternate between the workers
    loader.close()
    # resume mid-run: sample-exact, and the rest of the pass is the same
    first = windows.loader(batch_size=3, num_workers=2)
    first.run_batches = 2
    head, state = _three_batches_then_state(first)
    assert state["offset"] == 9
    resumed = windows.loader(batch_size=3, num_workers=2)
    resumed.run_batches = 2
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert head + _indices(rest) == _indices(reference)
    for a, b in zip(rest, reference[3:]):
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["imu"], b["imu"])
    resumed.close()


def _threads_in_worker(samples):
    from mmloader.video.backends import decoder_threads

    return {"index": torch.tensor([s["index"] for s in samples]), "threads": decoder_threads()}


def test_workers_times_decoder_threads_fit_the_machine(windows):
    from mmloader.video.backends import cpus_available

    for workers in (1, 2):
        loader = windows.loader(batch_size=8, num_workers=workers, collate_fn=_threads_in_worker)
        threads = {b["threads"] for b in loader}
        assert threads == {max(1, cpus_available() // workers)}
        loader.close()


def test_runs_hold_whole_shards_of_a_window_cache():
    """In index order with workers, a run is rounded up to whole ``run_alignment`` windows (a cache's shards), so no
    shard is split between two workers that would each decode it."""
    from mmloader.loader import _aligned

    assert _aligned(3, 8, 1) == 3  # no alignment asked
    assert _aligned(3, 8, 32) == 4 and _aligned(5, 8, 32) == 8  # 4 batches of 8 = one 32-window shard
    assert _aligned(1, 5, 32) == 32  # 32 batches of 5 = 5 shards: the first whole number of both
    assert _aligned(7, 16, 8) == 7  # batches of 16 always hold whole 8-window shards
    for block, bs, al in [(1, 3, 10), (9, 7, 4), (2, 32, 32)]:
        assert _aligned(block, bs, al) * bs % al == 0 and _aligned(block, bs, al) >= block
