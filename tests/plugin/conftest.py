"""Fixtures shared by the plugin's training tests: one small sample store and its 1-s video windows."""

from __future__ import annotations

import pytest

import mmloader


@pytest.fixture(scope="module")
def store(sample_store):
    return sample_store(videos=4, seconds=16, seed=2, defect_fraction=0.0)


@pytest.fixture(scope="module")
def windows(store):
    return mmloader.open(store).windows(sec=1, stride=0.5, modalities=["imu", "video"], frames=1, size=(32, 32))
