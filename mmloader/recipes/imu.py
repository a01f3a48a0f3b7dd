"""What every IMU recipe needs: the channel layout, time-stamp repair and gap detection.

Time is int64 nanoseconds on the recording's clock throughout. A *gap* is a period between two consecutive
samples longer than ``gap_factor`` × the median period; it is stored as ``(last sample before, first sample
after)`` in ns, so that windows mask it and never fill it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

NS = 1_000_000_000  # nanoseconds per second
CHANNELS = ["accl_x", "accl_y", "accl_z", "gyro_x", "gyro_y", "gyro_z"]  # the column order of a 6-axis IMU
UNITS = ["m/s^2"] * 3 + ["rad/s"] * 3


@dataclass
class ImuSeries:
    """One repaired IMU stream: ``t_ns (N,) int64`` strictly increasing, ``data (N, 6) float32`` in CHANNELS
    order, ``gaps`` as ``(last sample before, first sample after)`` ns, ``report``: what was done to it."""

    t_ns: np.ndarray
    data: np.ndarray
    gaps: list[tuple[int, int]]
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class SortedRows:
    """Rows sorted by time with repeated times removed (see ``sort_dedupe``)."""

    t_ns: np.ndarray
    columns: list[np.ndarray]
    reordered: int  # rows whose time was below the previous row's, in the order given
    duplicates: int  # rows dropped because their time repeats an earlier row's


def sort_dedupe(t_ns: np.ndarray, *columns: np.ndarray, t_read: np.ndarray | None = None) -> SortedRows:
    """Sort rows by ``t_ns`` (stable) and keep the first row of every repeated time.

    ``columns`` are row-aligned arrays reordered and filtered with ``t_ns``. ``reordered`` is counted on
    ``t_read`` when given (the times as read, before a unit conversion into ``t_ns``), else on ``t_ns``.
    """
    before = t_ns if t_read is None else t_read
    reordered = int((np.diff(before) < 0).sum()) if before.size > 1 else 0
    order = np.argsort(t_ns, kind="stable")
    t_ns = t_ns[order]
    columns = tuple(c[order] for c in columns)
    first = np.ones(t_ns.shape[0], dtype=bool)
    first[1:] = t_ns[1:] != t_ns[:-1]
    return SortedRows(t_ns=t_ns[first], columns=[c[first] for c in columns], reordered=reordered,
                      duplicates=int((~first).sum()))


def median_period_ns(t_ns: np.ndarray) -> float:
    """The median spacing of ``t_ns`` (>= 2 samples) in ns; ``NS / median_period_ns(t)`` is the measured rate."""
    return float(np.median(np.diff(t_ns)))


def find_gaps(t_ns: np.ndarray, gap_factor: float = 5.0, period: float | None = None) -> list[tuple[int, int]]:
    """``(last sample before, first sample after)`` of every period longer than ``gap_factor`` × the median
    period (``period`` when the caller has it already); ``[]`` for fewer than 2 samples."""
    d = np.diff(t_ns)
    if d.size == 0:
        return []
    limit = gap_factor * (float(np.median(d)) if period is None else period)
    return [(int(t_ns[i]), int(t_ns[i + 1])) for i in np.flatnonzero(d > limit)]


def gaps_relative_sec(gaps: list[tuple[int, int]], t0_ns: int) -> list[list[float]]:
    """Gaps as ``[seconds after t0_ns, length in seconds]`` (the form prepare reports list them in)."""
    return [[(a - t0_ns) / NS, (b - a) / NS] for a, b in gaps]


__all__ = ["CHANNELS", "NS", "UNITS", "ImuSeries", "SortedRows", "find_gaps", "gaps_relative_sec",
           "median_period_ns", "sort_dedupe"]
