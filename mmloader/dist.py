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


def _env_int(env: dict, name: str) -> int | None:
    """``env[name]`` as an int, None when unset or empty; a ValueError naming the variable when it is not one."""
    raw = env.get(name, "")
    if raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer") from None


def _from_env(env: dict) -> tuple[int, int, str] | None:
    """The launcher's ``(rank, world_size, source)``: torchrun's ``RANK`` of ``WORLD_SIZE``, or the tasks of one
    ``srun`` step (``SLURM_PROCID`` of ``SLURM_STEP_NUM_TASKS``: ``srun`` sets it, a batch script or ``salloc`` shell
    alone does not, so a single command there is not mistaken for one of several); None when neither is set. A SLURM
    array is not read: its tasks are often a sweep, not one job's parts (pass ``--rank $SLURM_ARRAY_TASK_ID
    --world-size $SLURM_ARRAY_TASK_COUNT`` to split one job over an array)."""
    world = _env_int(env, "WORLD_SIZE")
    if world is not None:
        rank = _env_int(env, "RANK")
        if rank is None and world > 1:
            raise ValueError(f"environment variable WORLD_SIZE={world} is set but RANK is not (torchrun sets both)")
        return rank or 0, world, "torchrun (RANK/WORLD_SIZE)"
    ntasks = _env_int(env, "SLURM_STEP_NUM_TASKS")
    if ntasks is not None:
        return _env_int(env, "SLURM_PROCID") or 0, ntasks, "srun (SLURM_PROCID/SLURM_STEP_NUM_TASKS)"
    return None


def launch_rank_world(rank: int | None = None, world_size: int | None = None,
                      env: dict | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in a job spread over processes or machines, from the first of:
    explicit ``rank``/``world_size`` (e.g. ``--rank/--world-size``; both or neither), an initialised
    ``torch.distributed`` group, torchrun's environment, an ``srun`` step's tasks; else ``(0, 1)``.
    ``env`` defaults to ``os.environ``. Raises ValueError naming the argument or variable that is off."""
    import os

    if (rank is None) != (world_size is None):
        raise ValueError("rank and world_size: give both or neither")
    source = "--rank/--world-size"
    if rank is None:
        r, w = rank_world()
        got = (r, w, "torch.distributed") if w > 1 else _from_env(os.environ if env is None else env)
        rank, world_size, source = got if got is not None else (0, 1, "")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world size {world_size} (from {source or 'defaults'}): "
                         f"expected world_size >= 1 and 0 <= rank < world_size")
    return rank, world_size


def part_of(n: int, rank: int, world_size: int) -> range:
    """The ``rank``-th of ``world_size`` contiguous, balanced slices of ``range(n)`` (sizes differ by at most one,
    the larger first); deterministic, disjoint, and together they cover ``range(n)``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world size {world_size}: expected 0 <= rank < world_size")
    base, extra = divmod(max(n, 0), world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
