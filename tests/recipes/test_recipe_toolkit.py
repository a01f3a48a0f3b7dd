"""The recipe toolkit (mmloader.recipes.base / rows / imu), through the third recipe docs/own-dataset.md shows.

The recipe is taken from the docs page itself (its code block), so the page cannot drift from the toolkit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import mmloader
from mmloader.errors import SourceFormatError
from mmloader.recipes.imu import find_gaps, gaps_relative_sec, median_period_ns, sort_dedupe

DOCS = Path(__file__).resolve().parents[2] / "docs" / "own-dataset.md"


def wrist_recipe_class():
    text = DOCS.read_text()
    section = text[text.index("### A recipe on the toolkit"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(DOCS), "exec"), namespace)
    return namespace["WristRecipe"]


def write_csv(path: Path, t: np.ndarray, hz: float = 50.0) -> None:
    acc = np.stack([np.sin(2 * np.pi * t), np.cos(2 * np.pi * t), np.full_like(t, 9.81)], axis=1)
    rows = "\n".join(f"{a:.6f},{x:.6f},{y:.6f},{z:.6f}" for a, (x, y, z) in zip(t, acc))
    path.write_text("t_sec,acc_x,acc_y,acc_z\n" + rows + "\n")


@pytest.fixture
def wrist_source(tmp_path):
    root = tmp_path / "wrist"
    root.mkdir()
    t = np.arange(0, 20, 1 / 50.0)
    write_csv(root / "s1.csv", t)
    # s2: out of order, a repeated row, and a 2-second hole (a gap)
    t2 = np.concatenate([t[:300], t[400:]])
    t2 = np.concatenate([t2[:10][::-1], t2[10:], t2[50:51]])
    write_csv(root / "s2.csv", t2)
    return root


def test_the_docs_recipe_writes_a_store_with_its_repairs_reported(wrist_source, tmp_path):
    Recipe = wrist_recipe_class()
    url = Recipe().prepare(str(wrist_source), str(tmp_path / "store"), progress=False)
    ds = mmloader.open(url)
    assert sorted(ds.recording_ids) == ["s1", "s2"]
    report = json.loads((tmp_path / "store" / "reports" / "prepare.json").read_text())
    assert report["totals"] == {"recordings": 2, "skipped": 0, "failed": 0}
    # 9 descents in the reversed first rows + 1 for the repeated row appended at the end
    assert report["recordings"]["s2"] == {"duplicates": 1, "reordered": 10}
    assert report["recordings"]["s1"] == {"duplicates": 0, "reordered": 0}
    assert ds.store.gaps["recording_id"].to_pylist() == ["s2"]  # the 2-s hole, and nothing else
    wins = ds.windows(sec=2.0, modalities=["wrist"], imu_hz=50.0)
    sample = wins[0]
    assert sample["wrist"].shape == (3, 100)
    # windows overlapping s2's hole are dropped as gaps, never zero-filled silently
    assert wins.report()["dropped"].get("wrist_gap", 0) >= 1


def test_errors_skip_lists_the_bad_recording_and_raise_leaves_nothing(wrist_source, tmp_path):
    (wrist_source / "bad.csv").write_text("t_sec,acc_x,acc_y,acc_z\n0.0,not-a-number,1,2\n")
    Recipe = wrist_recipe_class()
    url = Recipe().prepare(str(wrist_source), str(tmp_path / "skip"), progress=False, errors="skip")
    report = json.loads((tmp_path / "skip" / "reports" / "prepare.json").read_text())
    assert list(report["failed"]) == ["bad"] and "bad.csv" in report["failed"]["bad"]
    assert report["totals"] == {"recordings": 2, "skipped": 0, "failed": 1}
    assert sorted(mmloader.open(url).recording_ids) == ["s1", "s2"]

    with pytest.raises(SourceFormatError, match="bad.csv"):
        Recipe().prepare(str(wrist_source), str(tmp_path / "raise"), progress=False)
    assert not (tmp_path / "raise").exists()


def test_a_source_with_no_good_recording_is_refused(tmp_path):
    root = tmp_path / "wrist"
    root.mkdir()
    (root / "bad.csv").write_text("t_sec,acc_x,acc_y,acc_z\nx,y,z,w\n")
    with pytest.raises(SourceFormatError, match="no recording could be prepared"):
        wrist_recipe_class()().prepare(str(root), str(tmp_path / "store"), progress=False, errors="skip")
    assert not (tmp_path / "store").exists()


def test_sort_dedupe_counts_what_it_repairs():
    t = np.array([30, 10, 20, 20, 40], dtype=np.int64)
    x = np.array([3.0, 1.0, 2.0, 2.5, 4.0])
    rows = sort_dedupe(t, x)
    assert rows.t_ns.tolist() == [10, 20, 30, 40]
    assert rows.columns[0].tolist() == [1.0, 2.0, 3.0, 4.0]  # the first of a repeated time is kept
    assert (rows.reordered, rows.duplicates) == (1, 1)


def test_find_gaps_uses_the_median_period():
    t = np.array([0, 10, 20, 30, 100, 110, 120], dtype=np.int64)
    assert median_period_ns(t) == 10.0
    assert find_gaps(t, gap_factor=5.0) == [(30, 100)]
    assert find_gaps(t, gap_factor=8.0) == []
    assert find_gaps(np.array([5], dtype=np.int64)) == []
    assert gaps_relative_sec([(2_000_000_000, 3_500_000_000)], 1_000_000_000) == [[1.0, 1.5]]
