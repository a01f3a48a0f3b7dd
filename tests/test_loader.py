"""The loader: deterministic order, exact resume with any num_workers, disjoint shards across ranks."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mmloader
from mmloader.adapters.ego4d import Ego4DAdapter
from mmloader.errors import MediaError
from mmloader.samples import generate_ego4d_sample


@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    root = generate_ego4d_sample(tmp_path_factory.mktemp("l") / "ego4d", videos=3, seconds=16, seed=2,
                                 defect_fraction=0.0, progress=False)
    ds = mmloader.open(Ego4DAdapter().prepare(str(root), str(root.parent / "store"), progress=False))
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


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_sample_exact(windows, workers):
    full = _indices(windows.loader(batch_size=3, shuffle=True, seed=11, num_workers=workers))
    first = windows.loader(batch_size=3, shuffle=True, seed=11, num_workers=workers)
    head = []
    for k, batch in enumerate(first):
        head.append(batch["index"].tolist())
        if k == 2:
            break
    state = first.state_dict()
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
