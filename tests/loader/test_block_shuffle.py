"""The block shuffle (``shuffle="block"``): a pure function of (seed, epoch), local reads (windows permuted only inside
groups of ``buffer_blocks`` blocks), disjoint blocks across ranks, exact resume with any ``num_workers``."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import mmloader
from mmloader.loader import BLOCK_WINDOWS, WindowLoader, block_order

B, G = 5, 3  # block_windows, buffer_blocks of these tests


@pytest.fixture(scope="module")
def windows(sample_store):
    ds = mmloader.open(sample_store(videos=3, seconds=16, seed=2, defect_fraction=0.0))
    ws = ds.windows(sec=1, stride=0.5, modalities=["imu"])
    assert len(ws) > 3 * B * G  # 59 windows: 12 blocks, 4 groups
    return ws


def _indices(batches):
    return [b["index"].tolist() for b in batches]


def _block(n=1000, **kw):
    return WindowLoader(list(range(n)), shuffle="block", **{"block_windows": 10, "buffer_blocks": 4, **kw})


def test_order_is_a_pure_function_of_seed_and_epoch_and_a_permutation():
    a, b = _block(seed=7), _block(seed=7)
    assert np.array_equal(a.order(0), b.order(0)) and np.array_equal(a.order(5), b.order(5))
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), _block(seed=8).order(0))
    for n in (1000, 997, 1, 0):  # 997: a short last block
        for epoch in range(3):
            order = _block(n, seed=3).order(epoch)
            assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(n))
    assert not np.array_equal(a.order(0), np.arange(1000))


def test_windows_are_permuted_only_inside_their_group_of_blocks():
    for n, seed in [(1000, 0), (1000, 1), (600, 2)]:
        order = _block(n, seed=seed).order(0)
        groups = []
        for start in range(0, n, 40):  # a group: 4 whole blocks of 10 windows, in any order
            chunk = order[start: start + 40]
            members = sorted(set((chunk // 10).tolist()))
            assert len(members) == 4
            assert sorted(chunk.tolist()) == [w for m in members for w in range(10 * m, 10 * m + 10)]
            groups.append(members)
        assert sorted(b for g in groups for b in g) == list(range(n // 10))  # every block once
        assert any(max(g) - min(g) > 4 for g in groups)  # a group's blocks come from anywhere


def test_a_short_tail_of_blocks_joins_the_last_group():
    order = _block(1000, seed=6, buffer_blocks=3).order(0)  # 100 blocks: 32 groups of 3, then one of 4
    chunks = [order[k: k + 30] for k in range(0, 960, 30)] + [order[960:]]
    for chunk in chunks:
        members = sorted(set((chunk // 10).tolist()))
        assert len(members) == len(chunk) // 10 and sorted(chunk.tolist()) == [w for m in members
                                                                               for w in range(10 * m, 10 * m + 10)]
    assert len(chunks[-1]) == 40 and len(chunks) == 33


def test_windows_are_mixed_within_a_group():
    order = _block(seed=4).order(0)
    group = order[:40]
    assert not all(np.all(np.diff(group[k: k + 10]) == 1) for k in range(0, 40, 10))  # not just blocks in turn
    assert len(set((group[:10] // 10).tolist())) > 1


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [1000, 997])
def test_ranks_take_disjoint_blocks_that_cover_the_set(world, n):
    shares = [_block(n, seed=5, rank=r, world_size=world).order(2) for r in range(world)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(n))
    blocks = [set((s // 10).tolist()) for s in shares]
    for r in range(world):
        for q in range(r + 1, world):
            assert blocks[r].isdisjoint(blocks[q])
        # each rank's share is whole blocks
        assert sorted(shares[r].tolist()) == sorted(w for m in blocks[r] for w in range(10 * m, min(10 * m + 10, n)))
    # the same as block_order, and one rank alone is the whole set's order
    assert np.array_equal(shares[1], block_order(n, 10, 4, 5, 2, 1, world)[0])
    # even_shards: equal lengths, each rank dropping fewer than 2 * block_windows windows, the last of its order
    even = [_block(n, seed=5, rank=r, world_size=world, even_shards=True).order(2) for r in range(world)]
    assert len({len(s) for s in even}) == 1
    for full, trimmed in zip(shares, even):
        assert np.array_equal(full[: len(trimmed)], trimmed) and len(full) - len(trimmed) < 2 * 10
    # drop_last after that: whole batches
    dl = _block(n, seed=5, rank=0, world_size=world, even_shards=True, drop_last=True, batch_size=32)
    assert len(dl.order(2)) == len(even[0]) // 32 * 32 and len(dl) == len(even[0]) // 32


def test_each_window_once_per_epoch_through_the_loader(windows):
    loader = windows.loader(batch_size=4, shuffle="block", seed=2, block_windows=B, buffer_blocks=G)
    e0, e1 = sum(_indices(loader), []), sum(_indices(loader), [])
    assert sorted(e0) == sorted(e1) == list(range(len(windows)))
    assert e0 != e1 and loader.epoch == 2
    # a window's content is the window's
    b = next(iter(windows.loader(batch_size=4, shuffle="block", seed=2, block_windows=B, buffer_blocks=G)))
    assert torch.equal(b["imu"], torch.stack([windows[i]["imu"] for i in e0[:4]]))


def _collate_with_pid(samples):
    from mmloader.windows.collate import collate

    return {**collate(samples), "pid": os.getpid()}


def test_the_same_batches_at_0_and_2_workers_each_worker_reading_whole_groups(windows):
    kw = dict(batch_size=3, shuffle="block", seed=9, block_windows=B, buffer_blocks=G)
    reference = list(windows.loader(**kw))
    loader = windows.loader(**kw, num_workers=2, collate_fn=_collate_with_pid)
    got = list(loader)
    loader.close()
    assert _indices(got) == _indices(reference)
    for a, b in zip(got, reference):
        assert torch.equal(a["imu"], b["imu"]) and torch.equal(a["imu_mask"], b["imu_mask"])
    run = loader._run_length(len(got))
    assert run == 5  # one group: 15 windows, in batches of 3
    pids = [b["pid"] for b in got]
    assert all(pids[k] == pids[k // run * run] for k in range(len(pids)))  # a run is read by one worker
    assert all(pids[k] != pids[k - run] for k in range(run, len(pids), run))  # runs alternate


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_sample_exact(windows, workers):
    kw = dict(batch_size=4, shuffle="block", seed=11, block_windows=B, buffer_blocks=G, num_workers=workers)
    full = _indices(windows.loader(**kw))
    first = windows.loader(**kw)
    head = []
    for k, batch in enumerate(first):
        head.append(batch["index"].tolist())
        if k == 4:
            break
    state = first.state_dict()
    first.close()
    assert state["epoch"] == 0 and state["offset"] == 20 and state["shuffle"] == "block"
    assert state["block_windows"] == B and state["buffer_blocks"] == G
    resumed = windows.loader(**kw)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert head + _indices(rest) == full
    assert torch.equal(rest[0]["imu"], torch.stack([windows[i]["imu"] for i in full[5]]))
    # then the next epoch, as an uninterrupted run would have it
    nxt = windows.loader(**kw)
    nxt.set_epoch(1)
    assert _indices(resumed) == _indices(nxt)
    resumed.close()
    nxt.close()


def test_a_state_from_another_order_is_refused():
    state = _block(seed=1).state_dict()
    with pytest.raises(ValueError, match=r"^loader state was saved with block_windows=10, this loader has 20"):
        _block(seed=1, block_windows=20).load_state_dict(state)
    with pytest.raises(ValueError, match=r"^loader state was saved with buffer_blocks=4, this loader has 2"):
        _block(seed=1, buffer_blocks=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"^loader state was saved with shuffle='block', this loader has True"):
        WindowLoader(list(range(1000)), shuffle=True, seed=1).load_state_dict(state)
    old = WindowLoader(list(range(1000)), shuffle=True, seed=1).state_dict()
    old = {k: v for k, v in old.items() if k not in ("block_windows", "buffer_blocks")}  # a state from before
    WindowLoader(list(range(1000)), shuffle=True, seed=1).load_state_dict(old)
    with pytest.raises(ValueError, match=r"^loader state was saved with shuffle=True, this loader has 'block'"):
        _block(seed=1).load_state_dict(old)


def test_default_block_is_a_window_caches_shard_size(windows, tmp_path):
    assert WindowLoader(list(range(10)), shuffle="block").block_windows == BLOCK_WINDOWS == 256
    assert windows.loader(shuffle="block").block_windows == BLOCK_WINDOWS  # a WindowSet has no run_alignment
    cached = windows.cache(str(tmp_path / "cache"), progress=False, shard_size=8)
    loader = cached.loader(batch_size=4, shuffle="block", seed=3, buffer_blocks=2)
    assert loader.block_windows == cached.run_alignment == 8
    assert cached.loader(shuffle="block", block_windows=3).block_windows == 3  # an explicit size wins
    got = list(loader)
    order = sum(_indices(got), [])
    assert sorted(order) == list(range(len(windows)))
    assert order == block_order(len(windows), 8, 2, 3, 0)[0].tolist()
    position = {w: p for p, w in enumerate(order)}
    for k in range(cached.window_cache.n_shards):  # a shard's windows are read within one group of 2 shards
        spots = [position[w] for w in range(8 * k, min(8 * k + 8, len(windows)))]
        assert max(spots) - min(spots) < 16
    assert all(torch.equal(b["imu"], torch.stack([windows[i]["imu"] for i in b["index"].tolist()])) for b in got[:3])
    assert cached.window_cache.status(verify=False)["shards_complete"] == cached.window_cache.n_shards


BAD = [
    (dict(shuffle="blocks"), TypeError, r"^shuffle must be True or False, got str 'blocks' \(or 'block'"),
    (dict(shuffle=None), TypeError, r"^shuffle must be True or False, got NoneType"),
    (dict(shuffle="block", block_windows=0), ValueError, r"^block_windows must be >= 1, got 0"),
    (dict(block_windows=-3), ValueError, r"^block_windows must be >= 1, got -3"),
    (dict(shuffle="block", block_windows=2.0), TypeError, r"^block_windows must be an integer, got float"),
    (dict(shuffle="block", block_windows="8"), TypeError, r"^block_windows must be an integer, got str"),
    (dict(shuffle="block", block_windows=True), TypeError, r"^block_windows must be an integer, got bool"),
    (dict(shuffle="block", buffer_blocks=0), ValueError, r"^buffer_blocks must be >= 1, got 0"),
    (dict(buffer_blocks=None), TypeError, r"^buffer_blocks must be an integer, got NoneType"),
    (dict(shuffle="block", buffer_blocks=1.5), TypeError, r"^buffer_blocks must be an integer, got float"),
    (dict(shuffle="block", block_windows=6, rank=0, world_size=3), ValueError,
     r"^block_windows=6 cuts the 10 windows into 2 blocks, fewer than world_size \(3\)"),
]


@pytest.mark.parametrize("kw, error, message", BAD, ids=[repr(kw) for kw, _, _ in BAD])
def test_bad_arguments_are_refused_naming_the_argument(kw, error, message):
    with pytest.raises(error, match=message):
        WindowLoader(list(range(10)), **kw)


def test_good_arguments_are_plain_values(windows):
    ld = WindowLoader(list(range(10)), shuffle="block", block_windows=np.int64(3), buffer_blocks=np.int8(2),
                      rank=1, world_size=2)
    assert type(ld.block_windows) is int and type(ld.buffer_blocks) is int and ld.shuffle == "block"
    assert sorted(ld.order(0).tolist() + WindowLoader(list(range(10)), shuffle="block", block_windows=3,
                                                      buffer_blocks=2, rank=0, world_size=2).order(0).tolist()) \
        == list(range(10))
    assert WindowLoader([], shuffle="block", rank=0, world_size=4).order(0).tolist() == []  # nothing to shard
    with pytest.raises(ValueError, match=r"^block_windows must be >= 1"):
        windows.loader(shuffle="block", block_windows=0)
