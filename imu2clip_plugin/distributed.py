"""The plugin's process-level plumbing in one place: the rank and world of a ``torchrun`` run, its collectives
(barrier, gather of plain objects, sum), the state of every RNG, and durable atomic file writes.

Without an initialised process group every helper is the single-process identity: ``rank_world() == (0, 1)``,
``barrier()`` returns at once, ``all_gather_objects(x) == [x]``, ``all_reduce_sum`` leaves its tensor as it is.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmloader.dist import rank_world

__all__ = ["rank_world", "init_distributed", "shutdown_distributed", "is_main", "barrier", "all_gather_objects",
           "gather_objects", "broadcast_object", "all_reduce_sum", "rng_state", "set_rng_state", "fsync_dir",
           "write_durable", "atomic_write"]


# -- ranks and collectives -------------------------------------------------------------------------------
def init_distributed(device_pref: str = "auto") -> tuple[int, int, torch.device]:
    """``(rank, world, device)`` of this process, joining the process group first when ``torchrun`` launched
    several (``WORLD_SIZE > 1``: NCCL with CUDA, else gloo). ``device_pref``: "auto" (this rank's GPU,
    ``LOCAL_RANK``, when CUDA is available, else the CPU), "cuda", or any ``torch.device`` string."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank, world = rank_world()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu" if device_pref == "auto" else device_pref)
    return rank, world, device


def shutdown_distributed() -> None:
    """Leave the process group, if one is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_main() -> bool:
    """Rank 0 (the process that writes files and prints), or the only process."""
    return rank_world()[0] == 0


def barrier() -> None:
    """Wait for every rank (a no-op with one process)."""
    if rank_world()[1] > 1:
        torch.distributed.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order: ``[obj]`` with one process."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0 only (None on the others): ``[obj]`` with one
    process."""
    rank, world = rank_world()
    if world == 1:
        return [obj]
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    torch.distributed.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (the others pass anything, e.g. None)."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks, in place; returns it."""
    if rank_world()[1] > 1:
        torch.distributed.all_reduce(t)
    return t


# -- RNG state -------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every RNG's state (torch, numpy's legacy global RNG, Python's ``random``, CUDA's when available) as tensors
    and plain values, so a checkpoint holding it loads with ``torch.load(weights_only=True)``: numpy's key is an
    int64 tensor of 624 words, Python's state a list of 625 ints."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss_next = random.getstate()
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": [int(w) for w in words],
                   "gauss_next": None if gauss_next is None else float(gauss_next)},
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (the CUDA states only where CUDA is available)."""
    # RNG states are CPU ByteTensors; a checkpoint loaded with map_location="cuda" would have moved them
    torch.set_rng_state(st["torch"].cpu())
    n = st["numpy"]
    np.random.set_state((n["name"], n["key"].cpu().numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached_gaussian"])))
    p = st["python"]
    random.setstate((int(p["version"]), tuple(int(w) for w in p["state"]), p["gauss_next"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in st["cuda"]])


# -- durable, atomic writes ------------------------------------------------------------------------------
def fsync_dir(d: Path) -> None:
    """Flush a directory's entries (a rename in it survives a crash); a no-op where directories cannot be opened."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (replacing it) and fsync the file (not the directory)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: written durably to a temporary name beside it, renamed onto it,
    then the directory flushed. A crash leaves the old file or the new one, never a mix."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write_durable(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)
