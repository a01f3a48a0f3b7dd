"""The exact fast path of ``resample`` (grid points that are sample times) is bit-identical to Hermite
interpolation, mask included, and is never taken when a grid point falls between samples."""

from __future__ import annotations

import numpy as np
import pytest

from mmloader.windows import resample as rs

HZ = 200.0
P = 5_000_000  # ns


def reference(t_ns, x, grid_ns, gap_ns):
    """What ``resample`` computed before the fast path: Hermite on float seconds from the first grid point."""
    origin = grid_ns[0]
    y, valid = rs.hermite((t_ns - origin) / 1e9, np.asarray(x, np.float64), (grid_ns - origin) / 1e9, gap_ns / 1e9)
    return y.astype(np.float32), valid


def regular(n, start=1_700_000_000_123_000_000, seed=0):
    rng = np.random.default_rng(seed)
    return start + np.arange(n, dtype=np.int64) * P, rng.standard_normal((n, 6)).astype(np.float32)


def check_same(t, x, grid, gap=5 * P, fast_expected=True):
    got = rs.resample(t, x, grid, HZ, source_hz=HZ, max_gap_ns=gap)
    exp = reference(t, x, grid, gap)
    assert got[0].dtype == np.float32 and got[0].tobytes() == exp[0].tobytes()
    assert np.array_equal(got[1], exp[1])
    assert (rs._on_samples(t, x, grid, gap) is not None) == fast_expected
    return got


@pytest.mark.parametrize("offset", [0, 1, 37, 500, 998])
def test_contiguous_run_is_a_slice_and_identical(offset):
    t, x = regular(1500)
    grid = t[offset:offset + 500] if offset + 500 <= 1500 else t[offset:]
    y, valid = check_same(t, x, grid)
    assert valid.all() and np.array_equal(y, x[offset:offset + len(grid)])


def test_window_ending_on_the_last_sample_and_before_a_gap():
    t, x = regular(1000)
    check_same(t, x, t[-300:])  # the last grid point is the last sample (hermite's clipped interval)
    t_gap = np.concatenate([t[:600], t[600:] + 40 * P])  # a gap after sample 599
    y, valid = check_same(t_gap, x, t_gap[400:600])  # the last grid point sits just before the gap
    assert not valid[-1] and valid[:-1].all() and not y[-1].any()


def test_every_other_sample_and_other_strides():
    t, x = regular(2000)
    check_same(t, x, t[100:1100:2])  # a 100-Hz grid on 200-Hz samples: gathered, not a slice
    check_same(t, x, t[5:1900:3])


def test_between_samples_falls_back_to_hermite():
    t, x = regular(1000)
    check_same(t, x, t[100:400] + P // 2, fast_expected=False)
    grid = t[100:400].copy()
    grid[150] += 1  # one point 1 ns off
    check_same(t, x, grid, fast_expected=False)
    jitter = t + np.random.default_rng(1).integers(-P // 10, P // 10, t.size)
    jitter.sort()
    check_same(jitter, x, t[200:700], fast_expected=False)


def test_the_result_is_never_a_view_of_the_samples():
    t, x = regular(1000)
    y, _ = rs.resample(t, x, t[10:210], HZ, source_hz=HZ)
    y[:] = 0
    assert x[10:210].any()
