"""The run folder as a URL (S3 on loopback: moto's server mode, real HTTP through s3fs) with the checkpoint's
guarantees kept there, and ranks that do not share the run folder told so (2 gloo processes)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

import mmloader
from conftest import free_port, tiny_train_config

pytest.importorskip("open_clip")

from imu2clip_plugin import checkpoint as checkpoint_mod  # noqa: E402
from imu2clip_plugin.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from imu2clip_plugin.encoder import load_encoder  # noqa: E402
from imu2clip_plugin.train import CheckpointError, RunDirInUseError, TrainSetupError, train  # noqa: E402



@pytest.fixture(scope="module")
def s3(s3_options):
    """Storage options reaching the bucket ``mmtest`` of the loopback S3 server of tests/conftest.py."""
    return s3_options


@pytest.fixture(scope="module")
def fs(s3):
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True, **s3)


@pytest.fixture(scope="module")
def windows(sample_store):
    store = sample_store(videos=4, seconds=16, seed=2, defect_fraction=0.0)
    return mmloader.open(store).windows(sec=1, stride=0.5, modalities=["imu", "video"], frames=1, size=(32, 32))


def _cfg(run_dir, **kw):
    return tiny_train_config(run_dir, **{"use_cache": False, "device": "cpu", "max_steps": 8, **kw})


def test_a_run_on_s3_resumes_exactly_and_keeps_its_files_there(windows, s3, fs, tmp_path):
    url = "s3://mmtest/runs/resume"
    local = train(_cfg(tmp_path / "local"), windows=windows)
    first = train(_cfg(url, run_storage_options=s3, stop_after_steps=3), windows=windows)
    assert first["step"] == 3 and first["stopped_early"] and first["run_dir"] == url
    ck = load_checkpoint(f"{url}/checkpoint.pt", storage_options=s3)        # checksum verified, no pickle
    assert ck["step"] == 3 and ck["loader"]["offset"] == 24
    resumed = train(_cfg(url, run_storage_options=s3, resume=True), windows=windows)
    assert resumed["step"] == 8 and resumed["encoder_dir"] == f"{url}/encoder"
    a, b = local["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["best"] == local["best"]
    # what the run leaves, on S3: config, metrics (each step once), summary, checkpoint pair, the best encoder
    names = sorted(p.split("mmtest/runs/resume/")[1] for p in fs.find("mmtest/runs/resume"))
    assert names == ["checkpoint.pt", "checkpoint.pt.sha256.json", "config.json", "encoder/config.json",
                     "encoder/model.safetensors", "metrics.jsonl", "summary.json"]
    recs = [json.loads(x) for x in fs.cat_file("mmtest/runs/resume/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in recs if r["event"] == "train"] == list(range(1, 9))
    assert json.loads(fs.cat_file("mmtest/runs/resume/summary.json"))["best"] == resumed["best"]
    fs.get("mmtest/runs/resume/encoder", str(tmp_path / "enc"), recursive=True)
    best = load_checkpoint(f"{url}/checkpoint.pt", storage_options=s3)["best"]["encoder"]
    assert all(torch.equal(v, best[k]) for k, v in load_encoder(tmp_path / "enc").state_dict().items())
    # starting afresh there is refused, naming the URL
    with pytest.raises(RunDirInUseError, match=f"^{url}: this run directory already holds checkpoint.pt"):
        train(_cfg(url, run_storage_options=s3), windows=windows)


def test_checkpoints_at_a_url_keep_the_checksum_and_crash_guarantees(s3, fs, monkeypatch):
    url = "s3://mmtest/ck/checkpoint.pt"
    save_checkpoint({"format_version": 2, "step": 1, "w": torch.zeros(64)}, url, storage_options=s3)
    rec = json.loads(fs.cat_file("mmtest/ck/checkpoint.pt.sha256.json"))
    assert rec["sha256"] == hashlib.sha256(fs.cat_file("mmtest/ck/checkpoint.pt")).hexdigest()
    # killed after the record, before the partial object is moved into place: the next load completes the save
    monkeypatch.setattr(checkpoint_mod, "move_url", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"format_version": 2, "step": 2, "w": torch.ones(64)}, url, storage_options=s3)
    monkeypatch.undo()
    ck = load_checkpoint(url, storage_options=s3)
    assert ck["step"] == 2 and torch.equal(ck["w"], torch.ones(64))
    assert not fs.exists("mmtest/ck/checkpoint.pt.partial")
    # one flipped byte: refused by name
    raw = bytearray(fs.cat_file("mmtest/ck/checkpoint.pt"))
    raw[len(raw) // 2] ^= 0x40
    fs.pipe_file("mmtest/ck/checkpoint.pt", bytes(raw))
    with pytest.raises(CheckpointError, match=f"^{url}: checkpoint is corrupt"):
        load_checkpoint(url, storage_options=s3)
    fs.rm("mmtest/ck/checkpoint.pt.sha256.json")
    with pytest.raises(CheckpointError, match=f"^{url}: no checksum record checkpoint.pt.sha256.json"):
        load_checkpoint(url, storage_options=s3)


# -- a run folder that the ranks do not share ----------------------------------------------------------
def _worker(rank, world, port, windows, dirs, out):
    import os

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    said = []
    try:
        for case, resume in (("resume", True), ("fresh", False)):
            try:
                train(_cfg(dirs[case][rank], resume=resume, max_steps=4), windows=windows)
                said.append("trained")
            except TrainSetupError as e:
                said.append(str(e))
    finally:
        torch.distributed.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(said, f)


def test_ranks_that_do_not_share_the_run_folder_are_told_so(windows, tmp_path):
    import torch.multiprocessing as mp

    cut = tmp_path / "cut"
    assert train(_cfg(cut, stop_after_steps=2, max_steps=4), windows=windows)["step"] == 2
    # resume: rank 0's folder holds the checkpoint, rank 1's (another node's disk) is empty
    dirs = {"resume": [str(tmp_path / "n0" / "run"), str(tmp_path / "n1" / "run")],
            "fresh": [str(tmp_path / "n0" / "new"), str(tmp_path / "n1" / "new")]}
    shutil.copytree(cut, dirs["resume"][0])
    mp.spawn(_worker, args=(2, free_port(), windows, dirs, str(tmp_path / "said")), nprocs=2, join=True)
    said = [json.loads((tmp_path / f"said.{r}").read_text()) for r in range(2)]
    for r in range(2):
        resume, fresh = said[r]
        assert resume.startswith(f"{dirs['resume'][r]}: the ranks do not see the same run folder (rank 0 sees "
                                 "checkpoint record sha256"), resume
        assert "rank 1 sees no checkpoint" in resume and "stores and caches may be node-local" in resume.lower()
        assert "rank(s) [1] do not see the config.json rank 0 just wrote" in fresh, fresh
    assert not (tmp_path / "n1" / "run").exists()          # nothing was written on the refused resume


def test_a_file_url_is_the_local_folder(tmp_path):
    from imu2clip_plugin.rundir import RunDir

    run = RunDir(f"file://{tmp_path}/run")
    assert not run.remote and run.location == tmp_path / "run"
