"""Shuffled batches split across workers by storage affinity (``mmloader.shared_batch``): every worker reads only
its own recordings, the parts meet in one shared-memory slot of the main process, and the batches are exactly the
ones a single process reads."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import torch

from conftest import PartFailure, Wrapped, assert_batches
from mmloader import shared_batch as sb
from mmloader import shm

pytestmark = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm here (not Linux)")


def _files(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir(shm.SHM_DIR) if n.startswith(prefix))


def test_layout_is_the_batch_arrays_and_places_them_aligned():
    batch = {"recording_id": ["a", "b", "c"], "t0": torch.zeros(3, dtype=torch.float64),
             "imu": torch.zeros(3, 6, 10), "imu_mask": torch.ones(3, 10, dtype=torch.bool)}
    layout = sb.Layout.from_batch(batch)
    assert layout == sb.Layout((("imu", (6, 10), "float32"), ("imu_mask", (10,), "bool")))
    placed, nbytes = layout.place(5)
    assert placed == [("imu", 0, (5, 6, 10), "float32"), ("imu_mask", 1216, (5, 10), "bool")]  # 1200 B → 64-B aligned
    assert nbytes == 1216 + 64
    assert sb.Layout.from_batch({"x": torch.zeros(3, 2), "n": 3}) is None  # not one batch dimension throughout
    assert sb.Layout.from_batch({"x": torch.zeros(3, 2), "ids": ["a", "b"]}) is None
    assert sb.Layout.from_batch({"t0": torch.zeros(3)}) is None  # nothing big: not worth splitting


def test_split_follows_the_keys_and_refuses_lopsided_batches():
    parts = sb.split(np.array([4, 1, 2, 7, 0, 3]), 2)
    assert [p.tolist() for p in parts] == [[0, 2, 4], [1, 3, 5]]
    assert sb.split(np.array([1, 1, 1, 1, 3, 0]), 2) is None  # 5 of 6 windows on one worker
    assert sb.split(np.array([5]), 2) is None  # a batch of one window is read whole


def _two_parts(slots: sb.SharedSlots, writer: sb.PartWriter, batch: dict, layout: sb.Layout,
               positions: list[np.ndarray], in_place: bool) -> dict:
    """What the loader does with ``batch`` split at ``positions``, in one process (``writer`` plays every worker)."""
    n = len(batch["ids"])
    placed, nbytes = layout.place(n)
    slot, gen, path = slots.take(nbytes)
    if path is not None:
        writer.map(slot, gen, path)
        slots.acked(slot, gen)
    got = []
    for pos in positions:
        part = {k: ([v[int(p)] for p in pos] if isinstance(v, list) else v[torch.from_numpy(pos)]) for k, v in
                batch.items()}
        if in_place:  # the set reads its rows straight into the slot (read_batch(rows=, size=))
            alloc = writer.alloc(slot, gen, placed)
            for key, v in list(part.items()):
                if isinstance(v, torch.Tensor) and v.ndim >= 2 and v.dtype != torch.bfloat16:
                    whole = torch.from_numpy(alloc((n, *v.shape[1:]), v.numpy().dtype))
                    whole[torch.from_numpy(pos)] = v
                    part[key] = whole
        got.append((pos, writer.write(part, pos, n, slot, gen, placed)))
    return sb.merge(got, n, slots.views(slot, placed))


@pytest.mark.parametrize("in_place", [True, False])
def test_parts_written_into_one_slot_merge_into_the_batch(in_place):
    g = torch.Generator().manual_seed(0)
    batch = {"ids": [f"r{i % 3}" for i in range(7)], "t0": torch.arange(7, dtype=torch.float64) / 3,
             "x": torch.randn(7, 4, 5, generator=g), "mask": torch.rand(7, 5, generator=g) > 0.5,
             "half": torch.randn(7, 2, generator=g).to(torch.bfloat16), "label": torch.arange(7) * 11}
    layout = sb.Layout.from_batch(batch)
    tag = f"test-sb-{os.getpid()}"
    slots, writer = sb.SharedSlots(tag, workers=1, max_slots=2), sb.PartWriter()
    try:
        out = _two_parts(slots, writer, batch, layout, [np.array([0, 3, 4]), np.array([1, 2, 5, 6])], in_place)
        assert _files(f"mmloader-{tag}") == []  # every "worker" mapped it: its name is gone
        assert list(out) == list(batch)
        assert out["ids"] == batch["ids"]
        for key in ("t0", "x", "mask", "half", "label"):
            assert out[key].dtype == batch[key].dtype and torch.equal(out[key], batch[key]), key
        assert list(slots.free) == []  # the batch's arrays view the slot
        del out
        gc.collect()
        assert list(slots.free) == [0]  # ... and it is free again once they are gone
        out = _two_parts(slots, writer, batch, layout, [np.array([6, 0]), np.array([1, 2, 3, 4, 5])], in_place)
        assert torch.equal(out["x"], batch["x"]) and slots._made == 1  # the slot reused, no new file
    finally:
        writer.close()
        slots.close()
    assert _files(f"mmloader-{tag}") == []


def test_parts_that_disagree_raise_like_collate():
    layout = sb.Layout((("x", (3,), "float32"),))
    slots, writer = sb.SharedSlots(f"test-sbd-{os.getpid()}", workers=1, max_slots=1), sb.PartWriter()
    try:
        placed, nbytes = layout.place(4)
        slot, gen, path = slots.take(nbytes)
        writer.map(slot, gen, path)
        a = writer.write({"x": torch.zeros(2, 3)}, np.array([0, 1]), 4, slot, gen, placed)
        b = writer.write({"x": torch.zeros(2, 5)}, np.array([2, 3]), 4, slot, gen, placed)  # 5 columns: inline
        assert isinstance(a["x"], sb.InSlot) and isinstance(b["x"], np.ndarray)
        with pytest.raises(ValueError, match="'x'.*cannot be stacked"):
            sb.merge([(np.array([0, 1]), a), (np.array([2, 3]), b)], 4, slots.views(slot, placed))
        with pytest.raises(ValueError, match="different keys"):
            sb.merge([(np.array([0, 1]), a), (np.array([2, 3]), {"y": b["x"]})], 4, {})
        c = writer.write({"x": torch.ones(2, 5)}, np.array([0, 1]), 4, slot, gen, placed)
        both = sb.merge([(np.array([0, 1]), c), (np.array([2, 3]), b)], 4, {})  # both inline: stacked
        assert both["x"].tolist() == [[1.0] * 5] * 2 + [[0.0] * 5] * 2
        with pytest.raises(RuntimeError, match="never mapped"):
            writer.write({"x": torch.zeros(2, 3)}, np.array([0, 1]), 4, slot, gen + 1, placed)
    finally:
        writer.close()
        slots.close()


# -- through the loader ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imu_windows(tmp_path_factory):
    import mmloader

    rng = np.random.default_rng(1)
    recs = []
    for r in range(8):
        t = np.arange(2000 + 100 * r, dtype=np.int64) * 5_000_000 + r
        recs.append(mmloader.Recording(id=f"r{r}", timeseries={"imu": mmloader.TimeSeriesInput(
            t, rng.standard_normal((t.size, 6)).astype(np.float32), list("abcdef"), ["u"] * 6, rate_hz=200.0)}))
    store = mmloader.write_store(tmp_path_factory.mktemp("sb") / "s", recs)
    return mmloader.open(store).windows(sec=1.0, stride=0.5, modalities=["imu"])


def test_each_worker_reads_only_its_recordings_and_batches_are_unchanged(imu_windows, tmp_path):
    logged = Wrapped(imu_windows, log_dir=tmp_path)
    ref = list(imu_windows.loader(batch_size=24, shuffle=True, seed=3, num_workers=0, drop_last=True))
    from mmloader.loader import WindowLoader

    loader = WindowLoader(logged, batch_size=24, shuffle=True, seed=3, num_workers=2, drop_last=True)
    try:
        for epoch in range(2):
            got = list(loader)
            assert len(got) == len(ref)
            if epoch == 0:
                assert_batches(got, ref, "2 workers, split")
            del got
        pool = loader._pool
        assert pool is not None and pool.layout is not None and pool.shared is not None
        pids = loader.worker_pids
    finally:
        loader.close()
    assert _files(f"mmloader-{os.getpid()}-") == []
    read = {pid: [line.split()[1:] for line in (tmp_path / f"{pid}.log").read_text().splitlines()] for pid in pids}
    assert all(len(lines) >= len(ref) for lines in read.values())  # each worker read a part of every batch
    parity = {pid: {int(r[1:]) % 2 for line in lines for r in line} for pid, lines in read.items()}
    assert sorted(map(sorted, parity.values())) == [[0], [1]]  # no recording read by both: each its own half


def test_a_part_that_fails_raises_its_error_in_the_loop(imu_windows):
    from mmloader.loader import WindowLoader

    order = WindowLoader(imu_windows, batch_size=16, shuffle=True, seed=5).order(0)
    bad = int(order[16 * 9 + 3])  # in batch 9: split (the layout is known by then)
    loader = WindowLoader(Wrapped(imu_windows, bad=bad), batch_size=16, shuffle=True, seed=5, num_workers=2)
    seen = 0
    try:
        with pytest.raises(PartFailure, match=f"window {bad}: unreadable on purpose"):
            for _ in loader:
                seen += 1
    finally:
        loader.close()
    assert seen == 9
    assert _files(f"mmloader-{os.getpid()}-") == []


def test_workers_serve_a_process_holding_thousands_of_descriptors(imu_windows):
    """A process with a window cache open holds thousands of file descriptors: the loader's pipes then sit past
    1023, where ``select()`` fails ("filedescriptor out of range"); the loader must still take its batches."""
    import resource

    from mmloader.loader import WindowLoader

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1500:
        if hard != resource.RLIM_INFINITY and hard < 1500:
            pytest.skip(f"the open-file limit here is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1500, hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        assert max(held) > 1024
        ref = [b["index"].tolist() for b in WindowLoader(imu_windows, batch_size=32, shuffle=True, seed=1)]
        loader = WindowLoader(imu_windows, batch_size=32, shuffle=True, seed=1, num_workers=2)
        try:
            assert [b["index"].tolist() for b in loader] == ref
        finally:
            loader.close()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_parts_travel_as_builtins_and_come_back_equal():
    """``to_wire`` / ``from_wire``: a part's slot markers, numpy arrays (any shape and dtype, empty too) and other
    values come back equal, and the pickled wire form names no class (unpickling one per array and marker cost
    the main process more than the rest of a batch); object arrays travel as they are."""
    import pickle

    part = {"recording_id": ["a", "b", "a"], "t0": np.array([0.5, 1.5, 2.5]), "index": np.arange(3, dtype=np.int64),
            "imu": sb.IN_SLOT, "mask": np.array([[True, False], [False, True], [True, True]]),
            "empty": np.zeros((0, 4), dtype=np.float32), "none": None, "label": [1, 2, 3]}
    wire = sb.to_wire(part)
    raw = pickle.dumps(wire, protocol=pickle.HIGHEST_PROTOCOL)
    assert b"numpy" not in raw and b"mmloader" not in raw and b"InSlot" not in raw
    back = sb.from_wire(pickle.loads(raw))
    assert list(back) == list(part) and back["imu"] is sb.IN_SLOT and back["none"] is None
    for key in ("t0", "index", "mask", "empty"):
        assert back[key].dtype == part[key].dtype and back[key].shape == part[key].shape
        assert np.array_equal(back[key], part[key]), key
    assert back["recording_id"] == ["a", "b", "a"] and back["label"] == [1, 2, 3]
    objects = {"x": np.array([{"k": 1}, None], dtype=object)}
    again = sb.from_wire(pickle.loads(pickle.dumps(sb.to_wire(objects))))
    assert again["x"].dtype == object and again["x"][0] == {"k": 1} and again["x"][1] is None
