"""Loader faults with real processes: a killed worker raises (never hangs), a killed main process leaves no
worker or forkserver behind, errors raised in a worker keep their type and message."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import kill_leftovers, process_alive, wait_gone
from mmloader.errors import MediaError
from mmloader.loader import WindowLoader, WorkerError

linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc to find processes")


class SlowWindows:
    """A Dataset-like object: len + __getitem__ returning dicts of numbers and arrays; each item takes ``delay`` s."""

    def __init__(self, n: int = 64, delay: float = 0.0, bad: int | None = None, exit_on: int | None = None):
        self.n, self.delay, self.bad, self.exit_on = n, delay, bad, exit_on

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if i == self.bad:
            raise MediaError(f"/media/clip-{i}.mp4", f"pyav could not decode frame {i}")
        if i == self.exit_on:
            os._exit(3)
        time.sleep(self.delay)
        return {"index": i, "x": torch.full((3,), float(i)), "raw": np.arange(4) + i}


def test_batches_in_order_and_independent_of_workers():
    ws = SlowWindows(n=23)
    runs = [[b["index"].tolist() for b in WindowLoader(ws, batch_size=4, shuffle=True, seed=5, num_workers=w)]
            for w in (0, 1, 3)]
    assert runs[0] == runs[1] == runs[2]
    assert sorted(sum(runs[0], [])) == list(range(23))


def test_workers_persist_across_epochs_and_stop_on_break():
    loader = WindowLoader(SlowWindows(n=16), batch_size=4, num_workers=2)
    list(loader)
    pids = loader.worker_pids
    assert len(pids) == 2
    list(loader)
    assert loader.worker_pids == pids  # the same processes served the second epoch
    for _ in loader:
        break
    assert loader.worker_pids == []
    assert wait_gone(pids) == []
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["offset"] == 4


def test_sigkill_of_a_worker_raises_naming_it():
    loader = WindowLoader(SlowWindows(n=200, delay=0.01), batch_size=2, num_workers=2)
    it = iter(loader)
    next(it)
    victim = loader.worker_pids[1]
    os.kill(victim, signal.SIGKILL)
    t = time.monotonic()
    with pytest.raises(WorkerError, match=rf"worker 1 \(pid {victim}\) killed by signal SIGKILL .*batch"):
        for _ in it:
            pass
    assert time.monotonic() - t < 10
    assert loader.worker_pids == []  # the pool was stopped


def test_worker_exit_raises_naming_the_batch():
    loader = WindowLoader(SlowWindows(n=40, exit_on=13), batch_size=4, num_workers=2)
    with pytest.raises(WorkerError, match=r"loader worker \d \(pid \d+\) exited with code 3 before handing back "
                       r"batch \d+ of this pass") as info:
        list(loader)
    assert "batch 3 (windows [12, 13, 14, 15])" in str(info.value) or "batch 3 of this pass (windows [12, 13, 14, 15])" in str(info.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_worker_errors_keep_their_type_and_message(workers):
    loader = WindowLoader(SlowWindows(n=20, bad=9), batch_size=4, num_workers=workers)
    seen = []
    with pytest.raises(MediaError) as info:
        for b in loader:
            seen.append(b["index"].tolist())
    assert str(info.value) == "/media/clip-9.mp4: pyav could not decode frame 9"
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the batches before the failing one still arrive
    assert info.value.path == "/media/clip-9.mp4"
    if workers:
        note = "\n".join(getattr(info.value, "__notes__", []))
        assert "loader worker" in note and "windows [8, 9, 10, 11]" in note and "in __getitem__" in note


@linux_only
def test_a_stopped_worker_raises_after_the_timeout_naming_it_and_the_batch():
    loader = WindowLoader(SlowWindows(n=400, delay=0.01), batch_size=2, num_workers=2, timeout=3)
    it = iter(loader)
    next(it)
    pids = loader.worker_pids
    victim = pids[0]
    try:
        os.kill(victim, signal.SIGSTOP)
        t = time.monotonic()
        with pytest.raises(WorkerError) as info:
            for _ in it:
                pass
        took = time.monotonic() - t
        msg = str(info.value)
        assert 2.5 < took < 6, took
        assert re.search(rf"loader worker 0 \(pid {victim}, stopped\) has not handed back batch \d+ of this pass "
                         r"\(windows \[\d+, \d+\]\): no batch came back from any worker for 3 s \(timeout=3\)", msg), msg
        assert "the pool was stopped" in msg
        assert loader.worker_pids == []
        assert wait_gone(pids) == []  # the stopped worker was ended too (SIGTERM + SIGCONT)
    finally:
        kill_leftovers(pids)


class _SlowToUnpickle:
    """Takes ``delay`` s to unpickle in the main process, so a tensor after it is fetched late."""

    def __init__(self, delay: float):
        self.delay = delay

    def __reduce__(self):
        return (_slow_rebuild, (self.delay,))


def _slow_rebuild(delay: float) -> str:
    if os.environ.get("MMLOADER_TEST_WORKER") != "1":
        time.sleep(delay)
    return "slow"


def _stop_self_soon(delay: float) -> None:
    def stop() -> None:
        time.sleep(delay)
        os.kill(os.getpid(), signal.SIGSTOP)

    threading.Thread(target=stop, daemon=True).start()


def _collate_then_stop(items: list) -> dict:
    """Collates, and for the batch of window 0 stops this worker 0.5 s after sending it: before the main process,
    busy 1.5 s unpickling the first field, fetches the tensor's shared memory from it."""
    os.environ["MMLOADER_TEST_WORKER"] = "1"
    out = {"slow": _SlowToUnpickle(1.5), "index": torch.tensor([d["index"] for d in items]),
           "x": torch.stack([d["x"] for d in items])}
    if items[0]["index"] == 0:
        _stop_self_soon(0.5)
    return out


@linux_only
def test_a_worker_stopped_while_its_batch_is_received_raises_after_the_timeout(monkeypatch):
    """Pickled batches (where shared-memory slots are not available) fetch each tensor's memory from the worker
    while they are received: a worker stopped then blocks the receive itself, which the timeout must catch."""
    monkeypatch.setattr("mmloader.shm.available", lambda: False)
    loader = WindowLoader(SlowWindows(n=8), batch_size=2, num_workers=1, timeout=3, collate_fn=_collate_then_stop)
    pids: list[int] = []
    t = time.monotonic()
    try:
        with pytest.raises(WorkerError) as info:
            for _ in loader:
                pids = pids or loader.worker_pids
        took = time.monotonic() - t
        msg = str(info.value)
        found = re.search(r"loader worker 0 \(pid (\d+)\) did not finish handing back its batch within 3 s "
                          r"\(timeout=3\) while batch 0 of this pass \(windows \[0, 1\]\) was in flight; it was "
                          r"killed", msg)
        assert found, msg
        pids = [int(found.group(1))]
        assert took < 15, took  # (starting the forkserver, 1.5 s unpickling, the 3 s timeout)
        assert loader.worker_pids == []
        assert wait_gone(pids) == []
    finally:
        kill_leftovers(pids)


CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import torch
    from mmloader.loader import WindowLoader

    class Windows:
        def __len__(self):
            return 10_000
        def __getitem__(self, i):
            time.sleep(0.01)
            return {"index": i, "x": torch.zeros(3)}

    def descendants(root):
        kids = {}
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    stat = (p / "stat").read_text()
                except OSError:
                    continue
                fields = stat[stat.rindex(")") + 2:].split()
                kids.setdefault(int(fields[1]), []).append((int(p.name), fields[19]))
        out, todo = [], [root]
        while todo:
            for pid, start in kids.get(todo.pop(), []):
                out.append((pid, start))
                todo.append(pid)
        return out

    if __name__ == "__main__":
        loader = WindowLoader(Windows(), batch_size=2, num_workers=2)
        for k, batch in enumerate(loader):
            if k == 2:
                procs = descendants(os.getpid())
                Path(sys.argv[1] + ".tmp").write_text("\\n".join(f"{p} {s}" for p, s in procs))
                os.replace(sys.argv[1] + ".tmp", sys.argv[1])
            time.sleep(0.05)
""")


@linux_only
def test_sigkill_of_the_main_process_leaves_no_process_behind(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "pids.txt"
    child = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not out.exists():
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the child never started its workers"
            time.sleep(0.05)
        procs = [line.split() for line in out.read_text().splitlines()]
        # the forkserver, 2 workers (and multiprocessing's resource tracker)
        assert len(procs) >= 3, procs
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(process_alive(int(p), s) for p, s in procs):
            time.sleep(0.1)
        left = [p for p, s in procs if process_alive(int(p), s)]
        assert not left, f"still running 30 s after SIGKILL of their parent: {left}"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
@pytest.mark.parametrize("workers", [0, 2])
def test_pin_memory(workers):
    batch = next(iter(WindowLoader(SlowWindows(n=8), batch_size=4, num_workers=workers, pin_memory=True)))
    assert batch["x"].is_pinned() and batch["index"].is_pinned() and batch["index"].tolist() == [0, 1, 2, 3]
