"""Collating window samples into batches."""

from __future__ import annotations

from typing import Any, Sequence

import torch


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors along a new batch dimension; numbers become tensors (``t0``/``t1`` float64, ``index``
    int64); strings and lists (``recording_id``, ``text``) stay Python lists of length B."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    return {key: collate_values([s[key] for s in samples]) for key in samples[0]}


def collate_values(values: list[Any]) -> Any:
    """One key's values of a batch, as ``collate`` makes them (by the type of the first)."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(values)
    if isinstance(first, bool):
        return torch.tensor(values, dtype=torch.bool)
    if isinstance(first, int):
        return torch.tensor(values, dtype=torch.int64)
    if isinstance(first, float):
        return torch.tensor(values, dtype=torch.float64)
    return values


def batch_index_fields(windows: Any, indices: Any, names: Sequence[str] | None = None) -> dict[str, Any]:
    """``collate([windows.index_fields(i) for i in indices])`` (only the keys ``names``, when given): through
    ``windows.index_fields_batch(indices)`` (column by column, the same values and types) when the set has it."""
    fast = getattr(windows, "index_fields_batch", None)
    if fast is not None:
        out = fast(indices)
        return out if names is None else {k: out[k] for k in names}
    fields = [windows.index_fields(int(i)) for i in indices]
    return collate(fields if names is None else [{k: f[k] for k in names} for f in fields])
