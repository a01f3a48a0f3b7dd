"""Which frame a timestamp selects: the same rule for every backend."""

from __future__ import annotations

import numpy as np


def nearest_frames(pts_ns: np.ndarray, targets_ns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the frame whose pts is nearest to each target (ties → the earlier frame), and |error| in ns.

    ``pts_ns`` must be sorted ascending (the store's per-frame index).
    """
    targets_ns = np.asarray(targets_ns, dtype=np.int64)
    right = np.clip(np.searchsorted(pts_ns, targets_ns, side="left"), 0, len(pts_ns) - 1)
    left = np.clip(right - 1, 0, len(pts_ns) - 1)
    d_left = np.abs(targets_ns - pts_ns[left])
    d_right = np.abs(pts_ns[right] - targets_ns)
    idx = np.where(d_left <= d_right, left, right)
    return idx.astype(np.int64), np.minimum(d_left, d_right)
