"""Golden digests: what a fixed sample store serves, byte for byte, pinned across refactors.

The digests below were recorded on main before the architecture change (issue 12). A behaviour-preserving change
must leave them as they are. If one changes on purpose (a new sample generator, a new resampling filter), record
the new value with ``python tests/test_golden.py`` and say why in the commit message.

Every field of every window is hashed (IMU float32 bytes, masks, uint8 frames, frame times, text, labels, ids,
window bounds), through the plain window set and through its window cache, in index order and with the pyav
backend (the reference decoder).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mmloader
from mmloader.recipes import get_adapter
from mmloader.samples import generate_ego4d_sample

# recorded with av 18.1.0, numpy 2.4.6, torch 2.14.1 on x86_64
GOLDEN = {
    "windows": "8ad2de71cecc1c329968b1a7cc8bae359cd8164992e76016d56f9d9c2d416238",
    "report": {"candidates": 42, "kept": 16, "dropped": {"imu_gap": 3, "missing_imu": 7, "no_text": 16}, "recordings": 4},
}

SAMPLE = dict(videos=6, seconds=12.0, seed=3, defect_fraction=0.2, fps=10.0, size=(64, 48), progress=False)
WINDOWS = dict(sec=2.0, stride=1.5, modalities=["imu", "video", "text"], frames=2, size=(32, 32),
               label_stream="activities", video_backend="pyav")


def _feed(h: "hashlib._Hash", key: str, value: Any) -> None:
    h.update(key.encode())
    if isinstance(value, torch.Tensor):
        a = value.detach().cpu().contiguous().numpy()
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    elif isinstance(value, (list, tuple)):
        h.update(repr([str(v) for v in value]).encode())
    else:
        h.update(repr(value).encode())


def digest(windows: Any) -> str:
    """sha256 over every key and value of every window, in index order."""
    h = hashlib.sha256()
    h.update(str(len(windows)).encode())
    for i in range(len(windows)):
        sample = windows[i]
        for key in sorted(sample):
            _feed(h, key, sample[key])
    return h.hexdigest()


def build(tmp: Path):
    root = generate_ego4d_sample(tmp / "src", **SAMPLE)
    url = get_adapter("ego4d").prepare(str(root), str(tmp / "store"), progress=False)
    return mmloader.open(url).windows(**WINDOWS)


@pytest.fixture(scope="module")
def golden_windows(tmp_path_factory):
    return build(tmp_path_factory.mktemp("golden"))


def test_windows_match_the_recorded_digest(golden_windows):
    assert golden_windows.report() == GOLDEN["report"]
    assert digest(golden_windows) == GOLDEN["windows"]


def test_cached_windows_match_the_recorded_digest(golden_windows, tmp_path):
    cached = golden_windows.cache(str(tmp_path / "cache"), fill="eager", progress=False)
    assert digest(cached) == GOLDEN["windows"]


if __name__ == "__main__":  # record: python tests/test_golden.py
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        ws = build(Path(d))
        print(len(ws), digest(ws), file=sys.stdout)
