"""The first pass spread over ranks: ``mmloader cache build`` and ``imu2clip embed`` with ``--rank/--world-size``,
torchrun's environment, or a real 2-process gloo group. Each rank fills a disjoint, contiguous part of the shards;
together (and after a killed rank is rerun) they write the same cache as one process: every array byte and every
metadata file identical, commit records identical but for their ``written_by`` provenance (host, pid, time).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch
import torch.multiprocessing as tmp
from conftest import free_port

import mmloader
from mmloader.cache import PAUSE_ENV, WindowCache
from mmloader.cli import main
from mmloader.dist import launch_rank_world, part_of
from mmloader.loader import fill_cache

CLI_SPEC = ["--sec", "1", "--stride", "0.5", "--modalities", "imu", "video", "--frames", "2", "--size", "32", "40"]
K = 8  # windows per shard


@pytest.fixture(scope="module")
def store(sample_store):
    path = sample_store(videos=3, seconds=16, seed=2, defect_fraction=0.0)
    n = len(mmloader.open(path).windows(sec=1, stride=0.5, modalities=["imu", "video"], frames=2, size=(32, 40)))
    assert n > 6 * K  # enough shards for two ranks and a kill midway
    return path


def build_cmd(url: str, store: str, *extra: str) -> list[str]:
    return ["cache", "build", store, "--url", str(url), "--shard-size", str(K), "-q", *CLI_SPEC, *extra]


def cache_files(url: str, **storage_options) -> dict[str, object]:
    """Every file of a cache by relative path (bytes; commit records parsed, without ``written_by``); fill locks
    and temporary folders left out."""
    fs, root = fsspec.core.url_to_fs(str(url), **storage_options)
    out: dict[str, object] = {}
    for path in fs.find(root):
        rel = path[len(root.rstrip("/")) + 1:]
        if rel.split("/")[0] in ("locks", "tmp"):
            continue
        data = fs.cat_file(path)
        if rel.endswith("COMMIT.json"):
            commit = json.loads(data)
            commit.pop("written_by")
            out[rel] = commit
        else:
            out[rel] = data
    return out


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory) -> dict[str, object]:
    url = tmp_path_factory.mktemp("one-process") / "cache"
    assert main(build_cmd(url, store)) == 0
    files = cache_files(url)
    assert sum(r.endswith("COMMIT.json") for r in files) > 6
    return files


# -- ranks and parts -------------------------------------------------------------------------------------
def test_parts_are_contiguous_disjoint_and_cover_everything():
    for n in (0, 1, 7, 64, 1001):
        for world in (1, 2, 3, 8):
            parts = [part_of(n, r, world) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank 2 of world size 2"):
        part_of(10, 2, 2)


def test_rank_and_world_come_from_flags_torchrun_or_srun():
    assert launch_rank_world(env={}) == (0, 1)
    assert launch_rank_world(1, 3, env={"WORLD_SIZE": "8", "RANK": "5"}) == (1, 3)
    assert launch_rank_world(env={"WORLD_SIZE": "4", "RANK": "3"}) == (3, 4)
    assert launch_rank_world(env={"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "8"}) == (1, 2)
    # a batch script (SLURM_NTASKS without an srun step) and an array task (often a sweep) are one whole job each
    assert launch_rank_world(env={"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) == (0, 1)
    assert launch_rank_world(env={"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (0, 1)
    with pytest.raises(ValueError, match="WORLD_SIZE=2 is set but RANK is not"):
        launch_rank_world(env={"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="RANK='x'"):
        launch_rank_world(env={"WORLD_SIZE": "2", "RANK": "x"})
    with pytest.raises(ValueError, match="rank 4 of world size 4"):
        launch_rank_world(env={"WORLD_SIZE": "4", "RANK": "4"})
    with pytest.raises(ValueError, match="both or neither"):
        launch_rank_world(rank=1)


def test_cli_refuses_a_bad_rank_and_overwrite_with_several_ranks(store, tmp_path):
    with pytest.raises(SystemExit, match="--rank/--world-size"):
        main(build_cmd(tmp_path / "c", store, "--rank", "2", "--world-size", "2"))
    with pytest.raises(SystemExit, match="--overwrite with several ranks"):
        main(build_cmd(tmp_path / "c", store, "--rank", "0", "--world-size", "2", "--overwrite"))


# -- sequential ranks (torchrun / SLURM without a process group) -------------------------------------------
def test_each_rank_fills_only_its_part_and_together_they_match_one_process(store, reference, tmp_path):
    url = tmp_path / "c"
    cached = mmloader.open(store).windows(sec=1, stride=0.5, modalities=["imu", "video"], frames=2,
                                          size=(32, 40)).cache(str(url), shard_size=K)
    n = cached.window_cache.n_shards
    counts = fill_cache(cached, progress=False, rank=1, world_size=3)
    mine = part_of(n, 1, 3)
    assert (counts["first_shard"], counts["stop_shard"], counts["filled"]) == (mine.start, mine.stop, len(mine))
    assert WindowCache.inspect(str(url)).status(verify=False)["complete"] == list(mine)
    env = {**os.environ, "WORLD_SIZE": "3"}
    for rank in (2, 0):  # the launcher's environment, through the CLI
        out = subprocess.run([sys.executable, "-m", "mmloader.cli", *build_cmd(url, store)],
                             env={**env, "RANK": str(rank)}, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert f"rank         {rank} of 3" in out.stdout
    assert WindowCache.inspect(str(url)).status()["complete"] == list(range(n))
    assert cache_files(url) == reference


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_a_killed_rank_is_completed_by_its_rerun(store, reference, tmp_path, where, request):
    opts = request.getfixturevalue("s3_options") if where == "s3" else {}
    url = str(tmp_path / "c") if where == "local" else f"s3://mmtest/caches/killed-{tmp_path.name}"
    env = {**os.environ, "FSSPEC_S3": json.dumps(opts)} if opts else dict(os.environ)

    def rank1(pause: int | None = None) -> subprocess.Popen:
        argv = [sys.executable, "-m", "mmloader.cli", *build_cmd(url, store, "--rank", "1", "--world-size", "2")]
        return subprocess.Popen(argv, env={**env, **({PAUSE_ENV: str(pause)} if pause is not None else {})},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    assert subprocess.run([sys.executable, "-m", "mmloader.cli", *build_cmd(url, store, "--rank", "0",
                                                                           "--world-size", "2")],
                          env=env, capture_output=True).returncode == 0
    n = WindowCache.inspect(url, **opts).n_shards
    mine = part_of(n, 1, 2)
    victim = mine.start + 1  # rank 1 publishes its first shard, writes the second one's data, and dies
    proc = rank1(pause=victim)
    try:
        for line in proc.stderr:
            if f"paused before committing shard {victim}" in line:
                break
        else:
            pytest.fail(f"rank 1 exited ({proc.wait()}) without reaching shard {victim}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.communicate()
    st = WindowCache.inspect(url, **opts).status()
    assert st["torn"] == [victim] and set(st["missing"]) - {victim} == set(range(victim + 1, mine.stop))
    assert st["complete"] == list(range(victim))
    out, err = rank1().communicate()
    assert f"filled {mine.stop - victim}, already complete 1" in out, err
    if opts:  # this process listed the cache before the rerun wrote it: forget s3fs's cached listings
        fsspec.filesystem("s3", **opts).invalidate_cache()
    assert WindowCache.inspect(url, **opts).status()["complete"] == list(range(n))
    assert cache_files(url, **opts) == reference


# -- a real 2-process gloo group -----------------------------------------------------------------------------
def _gloo_worker(rank: int, world: int, port: int, argv: list[str], module: str, errors: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cli = __import__(module, fromlist=["main"])
        code = cli.main(argv)
        if code != 0:
            raise RuntimeError(f"rank {rank}: exit code {code}")
    except BaseException as e:  # the parent reads this: spawn's own error report loses the message on SystemExit
        Path(errors, f"rank{rank}").write_text(repr(e))
        raise
    finally:
        torch.distributed.destroy_process_group()


def run_gloo(argv: list[str], tmp_path: Path, module: str = "mmloader.cli") -> None:
    errors = tmp_path / "errors"
    errors.mkdir(exist_ok=True)
    try:
        tmp.spawn(_gloo_worker, args=(2, free_port(), argv, module, str(errors)), nprocs=2, join=True)
    except Exception as e:
        details = {p.name: p.read_text() for p in errors.iterdir()}
        raise AssertionError(f"the gloo run failed: {details or e}") from None


def test_a_two_process_gloo_build_matches_one_process(store, reference, tmp_path):
    url = tmp_path / "c"
    run_gloo(build_cmd(url, store), tmp_path)
    assert WindowCache.inspect(str(url)).status()["shards_complete"] == WindowCache.inspect(str(url)).n_shards
    assert cache_files(url) == reference
    writers = {json.loads(v)["written_by"]["pid"] for k, v in _raw_commits(url).items()}
    assert len(writers) == 2  # both ranks wrote, neither the whole cache


def _raw_commits(url) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in Path(url).glob("shards/*/COMMIT.json")}


def test_a_two_process_gloo_build_on_s3_matches_one_process(store, reference, tmp_path, s3_options):
    url = "s3://mmtest/caches/two-ranks"
    # the CLI takes no credentials: they reach it as users give them, through fsspec's configuration from the
    # environment (FSSPEC_S3, read when fsspec is imported in each spawned rank)
    os.environ["FSSPEC_S3"] = json.dumps(s3_options)
    try:
        run_gloo(build_cmd(url, store), tmp_path)
    finally:
        del os.environ["FSSPEC_S3"]
    assert cache_files(url, **s3_options) == reference


def test_imu2clip_embed_two_process_gloo_run_matches_one_process(store, tmp_path):
    pytest.importorskip("open_clip")
    argv = ["embed", store, "--sec", "1", "--stride", "0.5", "--frames", "1", "--size", "32", "32", "--seed", "3",
            "--shard-size", str(K)]
    one, two = tmp_path / "one", tmp_path / "two"
    from imu2clip_plugin.cli import main as imu2clip

    assert imu2clip([*argv, "--url", str(one)]) == 0
    run_gloo([*argv, "--url", str(two)], tmp_path, module="imu2clip_plugin.cli")
    a, b = cache_files(one), cache_files(two)
    assert a == b and any(k.startswith("shards/") and "video_emb" in k for k in a)
    assert len({json.loads(v)["written_by"]["pid"] for v in _raw_commits(two).values()}) == 2
