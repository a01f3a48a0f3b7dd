"""``mmloader bench --scale``: the smoke run through the CLI (JSON on stdout and in --output, every case with
positive windows/s, ratios to the bound, a table on stderr) and one-line usage errors (exit 2) for bad options."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from mmloader.bench.scale import EMB_DIM, RSS_WORKERS, SMOKE
from mmloader.cli import main


def test_scale_smoke(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mmloader.cli", "bench", "--scale", "--smoke", "--output",
                        str(tmp_path / "out.json")], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out == json.loads((tmp_path / "out.json").read_text())
    assert {"machine", "setup", "store", "index", "bound", "loader", "cache", "rss", "ratios", "notes"} <= out.keys()
    st, ix = out["store"], out["index"]
    assert st["recordings"] == SMOKE["recordings"] and st["bytes"] > 0 and st["write_s"] > 0
    assert st["windows"] == ix["windows"] == SMOKE["recordings"] * int(SMOKE["seconds"] - 5)  # 5 s, stride 1 s
    assert ix["seconds"] > 0 and ix["pickled_bytes"] > 0 and ix["rss_growth_mb"] is not None
    block = not any(n.startswith("block: skipped") for n in out["notes"])
    orders = ["ordered", "shuffled"] + (["block"] if block else [])
    assert out["bound"]["matches_loader"] is True and out["bound"]["window_shape"] == [6, 1000]
    assert all(out["bound"][o]["windows_per_s"] > 0 for o in orders)
    assert [(r["order"], r["workers"]) for r in out["loader"]] == [(o, w) for o in orders for w in SMOKE["workers"]]
    assert all(r["windows"] == st["windows"] and r["windows_per_s"] > 0 for r in out["loader"])
    assert all(len(r["per_epoch_windows_per_s"]) == SMOKE["loader_epochs"] and r["later_windows_per_s"] > 0
               and r["ratio_later"] > 0 for r in out["loader"])
    assert set(out["speedup_over_0_workers"]) == {f"{o}_w{w}" for o in orders for w in SMOKE["workers"] if w}
    assert all(v["first_epoch"] > 0 and v["later_epochs"] > 0 for v in out["speedup_over_0_workers"].values())
    cache = out["cache"]
    assert cache["windows"] == st["windows"] and cache["build_s"] > 0 and cache["bytes"] > st["windows"] * EMB_DIM * 4
    assert [r["order"] for r in cache["runs"]] == orders[1:] and all(r["windows_per_s"] > 0 for r in cache["runs"])
    rss = out["rss"]
    assert rss["workers"] == RSS_WORKERS and rss["same_workers"] is True
    assert len(rss["per_epoch"]) == SMOKE["epochs_rss"]
    assert all(len(e["worker_rss_mb"]) == RSS_WORKERS and min(e["worker_rss_mb"]) > 0 for e in rss["per_epoch"])
    assert len(rss["growth_pct"]) == RSS_WORKERS and all(math.isfinite(g) for g in rss["growth_pct"])
    expected = {f"loader_{o}_w{w}" for o in orders for w in SMOKE["workers"]} | {f"cache_{o}_w0" for o in orders[1:]}
    assert set(out["ratios"]) == expected
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in out["ratios"].values()), out["ratios"]
    table = r.stderr[r.stderr.index("machine "):]
    assert "bound shuffled" in table and "loader shuffled, 0 workers" in table and "rss " in table
    assert "speedup  shuffled_w1 over 0 workers" in table


@pytest.mark.parametrize("argv, message", [
    (["--scale", "--recordings", "0"], "--recordings, --channels and --batch-size must be >= 1"),
    (["--scale", "--only", "index,nope"], "unknown case(s) ['nope']"),
    (["--scale", "--seconds", "2"], "--seconds (2) must be >= --sec (5)"),
    (["--scale", "--epochs-rss", "1"], "--epochs-rss must be >= 2"),
    (["--scale", "--only", "index,parallel"], "--only parallel: the parallel bound runs in the rounds of a loader case"),
    (["--scale", "--synthetic"], "give no STORE and no --synthetic"),
    (["--scale", "--frames", "4"], "--frames: video benchmark option(s)"),
    (["--synthetic", "--recordings", "5"], "--recordings: option(s) of --scale only"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0


def test_bad_argument_exit_2_through_the_cli():
    r = subprocess.run([sys.executable, "-m", "mmloader.cli", "bench", "--scale", "--hz", "fast"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and "--hz" in r.stderr


def test_scale_loader_cases_without_the_bound():
    """Without the bound case the ratios are None and the table still prints (a dash)."""
    r = subprocess.run([sys.executable, "-m", "mmloader.cli", "bench", "--scale", "--smoke", "--only", "shuffled",
                        "--workers", "0"], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    run, = json.loads(r.stdout)["loader"]
    assert run["ratio"] is None and run["ratio_later"] is None and run["later_windows_per_s"] > 0
    assert "loader shuffled, 0 workers" in r.stderr


def test_scale_loader_rounds_take_turns_and_speedups_are_medians_of_their_ratios():
    """``--loader-rounds 3``: every worker count has 3 rounds (fresh loaders, taking turns epoch by epoch); its
    windows/s are the medians of the rounds', and a speedup is the median of the rounds' own ratios."""
    import statistics

    r = subprocess.run([sys.executable, "-m", "mmloader.cli", "bench", "--scale", "--smoke", "--only", "shuffled",
                        "--workers", "0", "1", "--loader-rounds", "3", "--recordings", "6"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    zero, one = out["loader"]
    for run in (zero, one):
        assert len(run["rounds"]) == 3
        assert run["windows_per_s"] == round(statistics.median(x["windows_per_s"] for x in run["rounds"]), 1)
        assert run["later_windows_per_s"] == round(statistics.median(x["later_windows_per_s"] for x in run["rounds"]), 1)
    sp = out["speedup_over_0_workers"]["shuffled_w1"]
    each = [a["windows_per_s"] / b["windows_per_s"] for a, b in zip(one["rounds"], zero["rounds"])]
    assert sp["first_epoch_rounds"] == [round(v, 3) for v in each]
    assert sp["first_epoch"] == round(statistics.median(each), 3)
    assert "round 3 of 3" in r.stderr and "median of rounds" in r.stderr


def test_scale_parallel_bound_takes_turns_in_the_loader_rounds():
    """``parallel`` with ``--workers 0 2``: a team of 2 independent processes takes its turn in each round of the
    loader case (fresh each round, every epoch of all its processes started together); its speed-up over the
    0-worker loader and the 2-worker loader's share of it are the medians of the rounds' own ratios."""
    import statistics

    r = subprocess.run([sys.executable, "-m", "mmloader.cli", "bench", "--scale", "--smoke", "--only",
                        "shuffled,parallel", "--workers", "0", "2", "--loader-rounds", "2", "--recordings", "6"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    zero, two = out["loader"]
    team, = out["parallel_bound"]
    assert team["processes"] == 2 and team["order"] == "shuffled" and team["windows"] == zero["windows"]
    assert len(team["rounds"]) == 2
    assert all(len(x["per_epoch_windows_per_s"]) == SMOKE["loader_epochs"] and min(x["per_epoch_windows_per_s"]) > 0
               for x in team["rounds"])
    assert team["windows_per_s"] == round(statistics.median(x["windows_per_s"] for x in team["rounds"]), 1)
    for key, (a, b) in (("parallel_speedup", (team, zero)), ("workers_of_parallel_bound", (two, team))):
        got = out[key]["shuffled_p2" if key == "parallel_speedup" else "shuffled_w2"]
        each = [x["later_windows_per_s"] / y["later_windows_per_s"] for x, y in zip(a["rounds"], b["rounds"])]
        assert got["later_epochs_rounds"] == [round(v, 3) for v in each]
        assert got["later_epochs"] == round(statistics.median(each), 3)
    assert "and [2] independent processes taking turns" in r.stderr
    assert "of bound shuffled_w2 over as many independent processes" in r.stderr
