"""Collating window samples into batches."""

from __future__ import annotations

from typing import Any, Sequence

import torch


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors along a new batch dimension; numbers become tensors (``t0``/``t1`` float64, ``index``
    int64); strings and lists (``recording_id``, ``text``) stay Python lists of length B."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, Any] = {}
    for key, first in samples[0].items():
        values = [s[key] for s in samples]
        if isinstance(first, torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(first, bool):
            out[key] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, int):
            out[key] = torch.tensor(values, dtype=torch.int64)
        elif isinstance(first, float):
            out[key] = torch.tensor(values, dtype=torch.float64)
        else:
            out[key] = values
    return out
