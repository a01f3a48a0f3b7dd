"""Every benchmark in benchmarks/ runs in its ``--smoke`` mode (seconds, tiny data) as a subprocess, exits 0 and
prints one JSON object with the keys its docstring promises; ``gpu_checks.sh`` fails when a check fails.

A benchmark whose optional dependency is not installed is skipped, naming it; nothing here needs a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

# benchmark → (modules it needs beyond the core install, top-level keys of its JSON)
BENCHMARKS: dict[str, tuple[tuple[str, ...], set[str]]] = {
    "store_integrity": ((), {"mmloader", "mmloader_path", "machine", "args", "write_long_s", "write_many_s",
                             "imu_windows", "imu_whole", "many_recordings", "open", "validate_long_s",
                             "validate_many_s", "store_bytes_many"}),
    "cache": ((), {"machine", "setup", "runs", "eager_build", "cached_batch_bit_identical"}),
    "loader": ((), {"machine", "setup", "imu_only", "imu_video", "skipped_backends"}),
    "remote_requests": (("moto", "boto3", "s3fs"), {"machine", "windows", "requests", "requests_per_window_first_read",
                                                    "requests_per_window_second_read"}),
    "train_step": (("open_clip",), {"machine", "model", "device", "torch_threads", "frame_size", "frames", "reduce",
                                    "video_size", "batch_size", "steps", "train_windows", "cache_build_s", "online",
                                    "cached", "speedup"}),
    "video": ((), {"machine", "video", "setup", "windows", "bound", "loader", "cache_first_epoch", "cache_build",
                   "ratios"}),
    "scale": ((), {"machine", "setup", "store", "index", "bound", "loader", "cache", "rss", "ratios", "notes"}),
}


def _missing(name: str) -> list[str]:
    return [m for m in BENCHMARKS[name][0] if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="module")
def smoke_runs(request, tmp_path_factory):
    """``python benchmarks/<name>.py --smoke`` of every selected, runnable benchmark, all started at once so that
    their start-ups (imports, sample generation) overlap. OMP_NUM_THREADS=1: several torch processes share few
    cores, and a smoke run checks that a benchmark works, not its speed. (Module scope runs before the autouse
    cache isolation, hence the explicit MMLOADER_CACHE_DIR.)"""
    here = Path(__file__).resolve()
    selected = {item.name.removeprefix("test_").removesuffix("_smoke") for item in request.session.items
                if Path(item.path).resolve() == here}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMLOADER_CACHE_DIR": str(tmp_path_factory.mktemp("bench-cache"))}
    procs = {}
    for name in BENCHMARKS:
        if name in selected and not _missing(name):
            log = tmp_path_factory.mktemp(f"bench-{name}")
            with open(log / "out", "w") as out, open(log / "err", "w") as err:
                procs[name] = (subprocess.Popen([sys.executable, str(BENCH / f"{name}.py"), "--smoke"],
                                                cwd=BENCH.parent, env=env, stdout=out, stderr=err), log)
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_smoke(smoke_runs: dict, name: str) -> dict:
    """The JSON of ``benchmarks/<name>.py --smoke``, after checking its exit status and its promised keys."""
    if _missing(name):
        pytest.skip(f"benchmarks/{name}.py needs {', '.join(_missing(name))} (not installed)")
    proc, log = smoke_runs[name]
    rc = proc.wait(timeout=240)
    assert rc == 0, f"benchmarks/{name}.py --smoke exited {rc}:\n{(log / 'err').read_text()[-4000:]}"
    out = json.loads((log / "out").read_text())
    keys = BENCHMARKS[name][1]
    assert isinstance(out, dict) and keys <= out.keys(), f"missing keys: {sorted(keys - set(out))}"
    assert {"cpus", "python", "mmloader"} <= out["machine"].keys()
    return out


def test_every_benchmark_is_smoke_tested():
    scripts = {p.stem for p in BENCH.glob("*.py")} - {"common"}
    assert scripts == set(BENCHMARKS)


def test_store_integrity_smoke(smoke_runs):
    out = run_smoke(smoke_runs, "store_integrity")
    assert out["args"]["smoke"] is True and out["many_recordings"]["recordings"] == out["args"]["recordings"]


def test_cache_smoke(smoke_runs):
    out = run_smoke(smoke_runs, "cache")
    assert out["cached_batch_bit_identical"] is True
    assert [r["workers"] for r in out["runs"]] == out["setup"]["workers"]
    assert all(r["cached_epoch"]["windows"] == out["setup"]["windows"] > 0 for r in out["runs"])


def test_loader_smoke(smoke_runs):
    out = run_smoke(smoke_runs, "loader")
    assert set(out["imu_video"]) | set(out["skipped_backends"]) == {"pyav", "decord", "torchcodec"}
    assert "pyav" in out["imu_video"]  # the reference decoder is always there
    for res in out["imu_video"].values():
        assert res["bare_decoder"]["frames"] > 0 and [r["workers"] for r in res["loader"]] == out["setup"]["workers"]


def test_remote_requests_smoke(smoke_runs):
    out = run_smoke(smoke_runs, "remote_requests")
    assert out["windows"] > 0 and out["requests"]["prepare"].get("PUT", 0) > 0
    assert set(out["requests"]) == {"prepare", "open", "build_windows", "read_all_windows", "read_again"}


def test_train_step_smoke(smoke_runs):
    out = run_smoke(smoke_runs, "train_step")
    assert out["device"] == "cpu" and out["online"]["windows"] > 0 and out["cached"]["windows"] > 0


def test_video_smoke(smoke_runs):
    out = run_smoke(smoke_runs, "video")
    assert {"backend", "codec", "gop", "resolution", "fps", "seconds_per_video", "preset"} <= out["video"].keys()
    assert out["video"]["codec"] == "h264" and out["video"]["measured_keyframe_interval"] == out["video"]["gop"]
    assert out["windows"] > 0 and out["bound"]["frames"] > 0 and out["bound"]["windows_per_s"] > 0
    assert [(r["shuffle"], r["workers"]) for r in out["loader"]] == [(False, 0), (True, 0)]
    assert len(out["cache_first_epoch"]) == 1 and out["cache_build"][0]["windows"] == out["cache_windows"] > 0
    base = {"loader_ordered_w0", "loader_shuffled_w0", "cache_first_epoch_w0", "cache_build_w0"}
    optional = {"profile_ordered_w0", "profile_shuffled_w0", "embed"}  # transcode profiles / open_clip, when here
    assert base <= set(out["ratios"]) <= base | optional, out["ratios"]
    assert ("embed" in out["ratios"]) == (importlib.util.find_spec("open_clip") is not None)
    if "profile" in out:
        assert out["profile_shuffled_gain"] > 0 and out["profile"]["video"]["gop"] <= 10
    assert all(isinstance(r, float) and math.isfinite(r) and r > 0 for r in out["ratios"].values()), out["ratios"]


def test_scale_smoke(smoke_runs):
    out = run_smoke(smoke_runs, "scale")
    assert out["setup"]["smoke"] is True and out["store"]["windows"] == out["index"]["windows"] > 0
    orders = {r["order"] for r in out["loader"]}
    assert {"ordered", "shuffled"} <= orders and all(out["bound"][o]["windows_per_s"] > 0 for o in orders)
    assert all(r["windows_per_s"] > 0 for r in out["loader"] + out["cache"]["runs"])
    assert all(len(r["per_epoch_windows_per_s"]) == out["setup"]["loader_epochs"] for r in out["cache"]["runs"])
    assert out["worker_start"]["forkserver_and_first_batch_s"] > 0  # measured before the cases (smoke: 0 and 1)
    assert {(r["order"], r["processes"]) for r in out["parallel_bound"]} == {(o, 1) for o in orders}
    assert all(r["windows_per_s"] > 0 for r in out["parallel_bound"])
    assert len(out["rss"]["per_epoch"]) == out["setup"]["epochs_rss"] and out["rss"]["same_workers"] is True
    assert out["ratios"] and all(isinstance(r, float) and math.isfinite(r) and r > 0 for r in out["ratios"].values())


# -- gpu_checks.sh: exercised with stand-ins for nvidia-smi, python and torchrun on PATH -----------------------------
def _fake_bin(tmp_path: Path, gpu: bool, python_rc: int, torchrun_ok: bool) -> dict[str, str]:
    """An environment whose PATH starts with stand-ins: ``nvidia-smi`` (works iff ``gpu``), ``python`` (exits
    ``python_rc``) and ``torchrun`` (writes the run's metrics.jsonl iff ``torchrun_ok``, else exits 4)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "nvidia-smi": "echo 'name, memory.total'; echo 'Stand-in GPU, 1 MiB'" if gpu else "exit 9",
        "python": f"echo \"stand-in python $*\"; exit {python_rc}",
        "torchrun": ('for a in "$@"; do case "$a" in run_dir=*) d="${a#run_dir=}";; esac; done\n'
                     'mkdir -p "$d" && echo \'{"step": 1}\' > "$d/metrics.jsonl"') if torchrun_ok else "exit 4",
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "NPROC")}
    return {**env, "PATH": f"{bin_dir}:/usr/bin:/bin", "LOG_DIR": str(tmp_path / "logs"),
            "RUN_DIR": str(tmp_path / "run")}


def _gpu_checks(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(BENCH / "gpu_checks.sh"), *args], capture_output=True, text=True, env=env,
                          cwd=BENCH.parent, timeout=60)


needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


@needs_bash
def test_gpu_checks_parses_and_lists_its_checks(tmp_path):
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_checks.sh")]).returncode == 0
    r = _gpu_checks(_fake_bin(tmp_path, gpu=False, python_rc=0, torchrun_ok=True), "--dry-run")
    assert r.returncode == 0 and r.stdout.count("[dry-run]") == 3


@needs_bash
def test_gpu_checks_without_a_gpu_runs_nothing_and_fails(tmp_path):
    r = _gpu_checks(_fake_bin(tmp_path, gpu=False, python_rc=0, torchrun_ok=True))
    assert r.returncode == 2 and "no GPU" in r.stderr and "stand-in python" not in r.stdout


@needs_bash
@pytest.mark.parametrize("python_rc, torchrun_ok, rc, failed", [
    (0, True, 0, []),
    (3, True, 1, ["plugin_tests", "train_step_vit"]),
    (0, False, 1, ["torchrun_train"]),
])
def test_gpu_checks_exit_status_follows_the_checks(tmp_path, python_rc, torchrun_ok, rc, failed):
    r = _gpu_checks(_fake_bin(tmp_path, gpu=True, python_rc=python_rc, torchrun_ok=torchrun_ok))
    assert r.returncode == rc, r.stdout + r.stderr
    assert sorted(line.split(":")[0][3:] for line in r.stdout.splitlines() if ": FAILED (" in line) == sorted(failed)
    assert r.stdout.count(": PASSED") == 3 - len(failed)  # every check ran, whatever failed before it
