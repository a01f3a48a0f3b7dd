"""`imu2clip train` under torchrun (2 CPU ranks, gloo) on `sample:ego4d`, as on several machines: the store is
prepared once into a shared cache root (no race), then the run is resumed with each rank given its own, new, local
folders (MMLOADER_CACHE_DIR and TMPDIR per rank, set from LOCAL_RANK by a wrapper script: node-local disks) and
only the run folder shared. The resumed 2-rank run ends where one uninterrupted process ends (batch 2 x 4 = 8).
The same with the run folder on S3 (moto's server on loopback) is marked slow; its fast twin, in-process, is
tests/plugin/test_run_folder.py."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmloader

pytest.importorskip("open_clip")

from imu2clip_plugin.cli import apply_overrides, load_config  # noqa: E402
from imu2clip_plugin.encoder import load_encoder  # noqa: E402
from imu2clip_plugin.train import TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = {"videos": 4, "seconds": 12, "defect_fraction": 0.0}
ENCODER = dict(conv_channels=[16, 16], kernel_sizes=[5, 5], norm_groups=4, gru_hidden=16, gru_layers=1, dropout=0.0)
PREPARES = re.compile(r"mmloader: rank (\d) of 2 \(pid \d+ on [^)]*\) prepares the ego4d sample .*? into (\S+)")
RANK_SCRIPT = """#!/bin/sh
# what a node-local launch does: this rank's own cache and temporary folders (PER_RANK_ROOT/rankN/...)
if [ -n "$PER_RANK_ROOT" ]; then
  export MMLOADER_CACHE_DIR="$PER_RANK_ROOT/rank$LOCAL_RANK/cache" TMPDIR="$PER_RANK_ROOT/rank$LOCAL_RANK/tmp"
  mkdir -p "$TMPDIR"
fi
exec "$PYTHON" -m imu2clip_plugin.cli "$@"
"""


def _sets(run_dir: str, batch_size: int, extra: dict | None = None) -> list[str]:
    sets = {"store": "sample:ego4d", "store_options": SAMPLE, "sec": 1, "stride": 0.5, "size": [32, 32],
            "batch_size": batch_size, "epochs": 2, "encoder": ENCODER, "device": "cpu", "run_dir": run_dir,
            "warmup_steps": 2, "lr": 0.003, **(extra or {})}
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in sets.items()]


def _torchrun(tmp_path: Path, run_dir: str, env: dict, *flags: str, extra: dict | None = None) -> str:
    """``imu2clip train`` on 2 ranks through the wrapper script; returns stderr."""
    script = tmp_path / "rank.sh"
    script.write_text(RANK_SCRIPT)
    script.chmod(0o755)
    args = [a for s in _sets(run_dir, 4, extra) for a in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
           str(script), "train", "--config", "imu_video", *args, *flags]
    full_env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    r = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stderr


def _reference(tmp_path: Path) -> dict[str, torch.Tensor]:
    """One process, batch 8, the same config and sample, uninterrupted: its final parameters."""
    d = apply_overrides(load_config("imu_video"), _sets(str(tmp_path / "ref"), 8, {"progress": False}))
    wins = mmloader.open("sample:ego4d", progress=False, **SAMPLE).windows(
        sec=1, stride=0.5, modalities=["imu", "video"], frames=1, size=(32, 32))
    out = train(TrainConfig.from_dict(d), windows=wins)
    assert out["step"] == 10
    return {k: v.detach().clone() for k, v in out["model"].state_dict().items()}


def _interrupted_then_resumed_on_node_local_folders(tmp_path: Path, run_dir: str, env: dict, read,
                                                    extra: dict | None = None) -> dict:
    """Run 1: a shared cache root, stopped after 3 of 10 steps. Run 2: --resume with a new folder per rank.
    Returns the final checkpoint (``read(name) -> bytes`` reads the run folder; ``extra``: more --set values)."""
    shared = tmp_path / "shared-cache"
    err = _torchrun(tmp_path, run_dir, {**env, "MMLOADER_CACHE_DIR": str(shared)},
                    extra={**(extra or {}), "stop_after_steps": 3})
    # exactly one preparation (rank 0's), the other rank waited; one store in the shared root
    assert [m.group(1) for m in PREPARES.finditer(err)] == ["0"], err[-3000:]
    (folder,) = (shared / "samples").iterdir()
    assert sorted(os.listdir(folder)) == ["src", "stores"] and len(os.listdir(folder / "stores")) == 1
    ck = torch.load(io.BytesIO(read("checkpoint.pt")), weights_only=True)
    assert ck["step"] == 3 and [s["rank"] for s in ck["loader"]] == [0, 1]

    nodes = tmp_path / "nodes"
    err = _torchrun(tmp_path, run_dir, {**env, "PER_RANK_ROOT": str(nodes), "MMLOADER_PREPARE_GRACE_S": "1"},
                    "--resume", extra=extra)
    # each rank's node-local folder got one copy, prepared by that rank alone
    found = sorted((m.group(1), m.group(2)) for m in PREPARES.finditer(err))
    assert [r for r, _ in found] == ["0", "1"], err[-3000:]
    assert all(where.startswith(str(nodes / f"rank{r}" / "cache")) for r, where in found)
    summary = json.loads(read("summary.json"))
    assert summary["step"] == 10 and not summary["stopped_early"] and summary["exported"] == "best"
    assert summary["best"]["metric"] == "imu_video_r1" and summary["best"]["step"] in (5, 10)
    return torch.load(io.BytesIO(read("checkpoint.pt")), weights_only=True)


def test_torchrun_prepares_once_and_resumes_with_node_local_folders(tmp_path):
    run = tmp_path / "run"                                 # the shared run folder
    ck = _interrupted_then_resumed_on_node_local_folders(tmp_path, str(run), {}, lambda n: (run / n).read_bytes())
    assert ck["step"] == 10 and len(ck["rng"]) == 2
    ref = _reference(tmp_path)
    for k, v in ck["model"].items():
        torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-5, msg=k)
    # the exported encoder is the best one the checkpoint records
    exported = load_encoder(run / "encoder").state_dict()
    assert all(torch.equal(exported[k], v) for k, v in ck["best"]["encoder"].items())
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r["event"] == "train"]
    assert steps == list(range(1, 11))


@pytest.mark.slow
def test_torchrun_with_the_run_folder_on_s3(tmp_path):
    import socket

    import boto3
    import fsspec
    from moto import server as moto_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket="mmtest")
        # the keys from the ranks' environment (never in config.json), the endpoint in run_storage_options
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        so = {"client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        fs = fsspec.filesystem("s3", key="testing", secret="testing", skip_instance_cache=True, **so)

        def read(name: str) -> bytes:
            fs.invalidate_cache()
            return fs.cat_file(f"mmtest/runs/multi/{name}")

        ck = _interrupted_then_resumed_on_node_local_folders(tmp_path, "s3://mmtest/runs/multi", env, read,
                                                             extra={"run_storage_options": so})
        assert ck["step"] == 10 and len(ck["loader"]) == 2
        assert json.loads(read("summary.json"))["encoder_dir"] == "s3://mmtest/runs/multi/encoder"
        assert fs.exists("mmtest/runs/multi/encoder/model.safetensors") and b"testing" not in read("config.json")
    finally:
        server.stop()
