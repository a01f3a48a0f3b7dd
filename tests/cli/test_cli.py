"""The command line, run as a real subprocess where it matters (exit codes, stderr)."""

from __future__ import annotations

import json
import subprocess
import sys

from mmloader.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "mmloader.cli", *args], capture_output=True, text=True)


def test_prepare_info_validate(ego4d_tree, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["prepare", "ego4d", str(ego4d_tree), str(store), "-q"]) == 0
    out = capsys.readouterr().out
    assert "prepared 2 recordings" in out and '"imu_gaps": 0' in out
    assert main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "recordings   2" in out and "imu" in out and "narrations" in out
    assert main(["info", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recordings"] == 2
    assert main(["validate", str(store)]) == 0


def test_validate_reports_damage_with_exit_1(ego4d_tree, tmp_path):
    store = tmp_path / "store"
    assert main(["prepare", "ego4d", str(ego4d_tree), str(store), "-q"]) == 0
    chunk = next(p for p in store.rglob("*") if p.is_file() and "/data/c/" in str(p))
    chunk.write_bytes(b"x")
    r = run("validate", str(store))
    assert r.returncode == 1 and "size 1 bytes, expected" in r.stderr and "1 problem(s)" in r.stdout
    (store / "gaps.parquet").write_bytes(b"x")
    r = run("validate", str(store))
    assert r.returncode == 1 and "gaps.parquet: not a readable Parquet file" in r.stderr


def test_errors_go_to_stderr_with_exit_1(tmp_path):
    r = run("info", str(tmp_path / "nothing"))
    assert r.returncode == 1 and "no such store" in r.stderr and r.stdout == ""
    r = run("prepare", "nosuchdataset", str(tmp_path), str(tmp_path / "s"))
    assert r.returncode == 1 and "unknown dataset 'nosuchdataset'" in r.stderr


def test_existing_destination_needs_overwrite(ego4d_tree, tmp_path):
    store = tmp_path / "store"
    assert main(["prepare", "ego4d", str(ego4d_tree), str(store), "-q"]) == 0
    r = run("prepare", "ego4d", str(ego4d_tree), str(store), "-q")
    assert r.returncode == 1 and "--overwrite" in r.stderr
    assert run("prepare", "ego4d", str(ego4d_tree), str(store), "-q", "--overwrite").returncode == 0


def test_usage_error_exit_2():
    assert run("frobnicate").returncode == 2


def test_mmloader_never_imports_the_plugin_or_open_clip():
    code = "import sys, mmloader, mmloader.cli, mmloader.recipes.ego4d.recipe; " \
           "bad = [m for m in sys.modules if m.split('.')[0] in ('imu2clip_plugin', 'open_clip', 'torch')]; print(bad)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]"
