"""Clock conversions and resampling edge cases."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from mmloader.video.probe import ticks_to_ns
from mmloader.windows.resample import resample


def test_ticks_to_ns_is_exact_and_does_not_overflow():
    # a 1/1e9 time base past 9.2 s overflowed int64 when multiplied by 1e9 first
    t = np.array([0, 1, 86_347_942_362, 10**15], dtype=np.int64)
    assert ticks_to_ns(t, Fraction(1, 10**9)).tolist() == t.tolist()
    assert ticks_to_ns(np.array([512, 15361]), Fraction(1, 15360)).tolist() == [33_333_333, 1_000_065_104]
    assert ticks_to_ns(np.array([3]), Fraction(1001, 30000)).tolist() == [100_100_000]


def test_downsampling_a_slice_shorter_than_the_filter_is_masked_not_a_crash():
    t = (np.arange(60) * 1_000_000).astype(np.int64)  # 60 ms at 1000 Hz: shorter than the filter
    x = np.sin(t / 1e8)[:, None].repeat(6, axis=1)
    grid = np.arange(10, dtype=np.int64) * 5_000_000
    y, mask = resample(t, x, grid, target_hz=200.0, source_hz=1000.0)
    assert y.shape == (10, 6) and not mask.any() and not y.any()
