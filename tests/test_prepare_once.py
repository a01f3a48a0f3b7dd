"""mmloader.open prepares a store once when several processes open it at the same time (mmloader.coordinate):
real processes (spawned, one pair with a gloo process group, one with torchrun's environment only), real sample
generation and preparation into empty cache roots, counted by wrapping the real functions inside each process."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest

import mmloader
from mmloader import coordinate
from mmloader.coordinate import PrepareTimeoutError, prepare_once

from conftest import free_port

SAMPLE = dict(videos=3, seconds=10, defect_fraction=0.0)


def _counting(log_path: str, rank: int) -> None:
    """Wrap the sample generator and the Ego4D recipe's prepare so that each call appends a line to ``log_path``."""
    import mmloader.samples.ego4d as sample_mod
    from mmloader.recipes.ego4d.recipe import Ego4DAdapter

    def note(kind: str, where: str) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps({"kind": kind, "rank": rank, "where": where}) + "\n")

    real_generate, real_prepare = sample_mod.generate_ego4d_sample, Ego4DAdapter.prepare

    def generate(out_dir, *a, **k):
        note("generate", str(out_dir))
        return real_generate(out_dir, *a, **k)

    def prepare(self, root, dst, *a, **k):
        note("prepare", str(dst))
        return real_prepare(self, root, dst, *a, **k)

    sample_mod.generate_ego4d_sample = generate
    Ego4DAdapter.prepare = prepare


def _worker(rank: int, world: int, env: dict, log_path: str, out_path: str, start, use_group: bool, port: int):
    os.environ.update(env[rank])
    if use_group:
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    _counting(log_path, rank)
    start.wait()   # both processes call open at the same moment
    ds = mmloader.open("sample:ego4d", progress=False, **SAMPLE)
    with open(out_path, "a") as f:
        f.write(json.dumps({"rank": rank, "url": ds.url, "generation": ds.store.manifest["generation"],
                            "recordings": len(ds.recording_ids)}) + "\n")
    if use_group:
        dist.destroy_process_group()


def _run_two(tmp_path, env: dict, use_group: bool) -> tuple[list[dict], list[dict]]:
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    log_path, out_path = str(tmp_path / "calls.jsonl"), str(tmp_path / "opened.jsonl")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, env, log_path, out_path, start, use_group, port))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"
    read = lambda p: [json.loads(x) for x in open(p).read().splitlines()] if os.path.exists(p) else []  # noqa: E731
    return read(log_path), sorted(read(out_path), key=lambda r: r["rank"])


def test_two_ranks_with_a_process_group_prepare_a_shared_cache_once(tmp_path):
    root = tmp_path / "shared-cache"
    env = {r: {"MMLOADER_CACHE_DIR": str(root)} for r in range(2)}
    calls, opened = _run_two(tmp_path, env, use_group=True)
    # exactly one generation and one preparation, by rank 0; the other rank waited
    assert [(c["kind"], c["rank"]) for c in calls] == [("generate", 0), ("prepare", 0)], calls
    # both ranks read the same store (its creation record: one generation id)
    assert len(opened) == 2 and opened[0]["url"] == opened[1]["url"]
    assert opened[0]["generation"] == opened[1]["generation"] and opened[0]["recordings"] == 3
    (folder,) = (root / "samples").iterdir()
    assert sorted(os.listdir(folder)) == ["src", "stores"]   # no lock file, no partial folder left
    assert len(os.listdir(folder / "stores")) == 1


def test_ranks_with_their_own_cache_roots_prepare_one_copy_each(tmp_path):
    """torchrun's environment only (no process group), a different MMLOADER_CACHE_DIR per rank (node-local disks):
    the second rank waits its grace period, finds nothing in its folder, and prepares its own copy."""
    env = {r: {"MMLOADER_CACHE_DIR": str(tmp_path / f"node{r}"), "RANK": str(r), "WORLD_SIZE": "2",
               "LOCAL_RANK": "0" if r == 0 else "1", coordinate.GRACE_ENV: "0.5"} for r in range(2)}
    calls, opened = _run_two(tmp_path, env, use_group=False)
    preps = [c for c in calls if c["kind"] == "prepare"]
    assert sorted(c["rank"] for c in preps) == [0, 1]
    for c in preps:   # each rank wrote into its own root only
        assert c["where"].startswith(str(tmp_path / f"node{c['rank']}"))
    assert [o["url"].startswith(str(tmp_path / f"node{o['rank']}")) for o in opened] == [True, True]
    assert opened[0]["recordings"] == opened[1]["recordings"] == 3


# -- the helper on its own (in-process) ----------------------------------------------------------------------
def test_a_held_lock_makes_others_wait_and_the_wait_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    dst = str(tmp_path / "stores" / "thing")
    os.makedirs(tmp_path / "stores")
    other = coordinate._FolderLock(coordinate.lock_path(dst))   # another open file: flock conflicts
    assert other.try_acquire({"rank": 0, "world_size": 2, "pid": 4242, "host": "nodeA"})
    ran = []
    t0 = time.monotonic()
    with pytest.raises(PrepareTimeoutError) as e:
        prepare_once(dst, lambda: False, lambda: ran.append(1), what="the thing", progress=False, timeout_s=0.6)
    assert time.monotonic() - t0 < 5 and not ran
    msg = str(e.value)
    assert msg.startswith(f"{dst}:") and coordinate.lock_path(dst) in msg and "rank 0 of 2 (pid 4242 on nodeA)" in msg
    assert coordinate.TIMEOUT_ENV in msg and isinstance(e.value, TimeoutError)
    # the holder publishes: the waiter returns without preparing, as soon as it sees the store
    marker = tmp_path / "ready"
    marker.touch()
    assert prepare_once(dst, marker.exists, lambda: ran.append(1), what="the thing", progress=False) is False
    other.release()
    assert not os.path.exists(coordinate.lock_path(dst)) and not ran


def test_prepare_runs_once_releases_its_lock_and_a_failure_lets_the_next_try(tmp_path, capsys):
    dst = str(tmp_path / "s")
    done = []

    def fail():
        raise RuntimeError("prepare failed")

    with pytest.raises(RuntimeError, match="prepare failed"):
        prepare_once(dst, lambda: bool(done), fail, what="the store", progress=False)
    assert os.listdir(tmp_path) == []             # the lock file went with the failure
    assert prepare_once(dst, lambda: bool(done), lambda: done.append(1), what="the store") is True
    assert prepare_once(dst, lambda: bool(done), lambda: done.append(1), what="the store") is False
    assert done == [1] and os.listdir(tmp_path) == []
    err = capsys.readouterr().err
    assert err.count("prepares the store into") == 1 and err.count("prepared the store in") == 1


def test_a_killed_holder_never_leaves_a_stale_lock(tmp_path):
    dst = str(tmp_path / "s")
    lock = coordinate.lock_path(dst)
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, lock], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        assert coordinate._FolderLock(lock).held_by_other()
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
    done = []
    assert prepare_once(dst, lambda: bool(done), lambda: done.append(1), what="x", progress=False, timeout_s=5)
    assert done == [1]


def test_a_url_destination_is_prepared_by_rank_0_and_awaited_by_the_others(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    ran = []
    with pytest.raises(PrepareTimeoutError, match=r"^memory://stores/a: .* rank 0"):
        prepare_once("memory://stores/a", lambda: False, lambda: ran.append(1), what="a", progress=False,
                     timeout_s=0.3)
    assert not ran
    monkeypatch.setenv("RANK", "0")
    assert prepare_once("memory://stores/a", lambda: bool(ran), lambda: ran.append(1), what="a", progress=False)
    assert ran == [1]


def test_a_bad_timeout_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(coordinate.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=coordinate.TIMEOUT_ENV):
        prepare_once(str(tmp_path / "s"), lambda: False, lambda: None, what="x", progress=False)
