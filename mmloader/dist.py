"""The process's place in a ``torch.distributed`` run: one helper shared by the loader and the plugin.

Core layer: imports nothing from mmloader, and torch only when called (``import mmloader`` stays free of torch).
"""

from __future__ import annotations


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default ``torch.distributed`` process group when one is initialised, else
    ``(0, 1)`` (also when torch, or its distributed package, is not available)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency of the loader, not of the core
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
