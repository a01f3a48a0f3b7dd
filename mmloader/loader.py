"""A resumable, shardable loader on ``torchdata.nodes``.

Pipeline: this rank's window order → batches of indices → (parallel) read + collate → pin memory → prefetch.

- **Order** is a pure function of ``(seed, epoch)``: a permutation of all windows (or ``0..N-1`` unshuffled);
  rank ``r`` of ``W`` takes ``order[r::W]`` — disjoint shares whose sizes differ by at most one
  (``even_shards=True`` trims every share to the same length).
- **State** is ``(epoch, offset)``, ``offset`` = samples already yielded in this epoch. Resuming starts the
  pipeline at that offset: sample-exact, with any ``num_workers``, and nothing is replayed.
- Workers (processes, started through a ``forkserver`` by default) each read whole batches; results come back in order, so the sequence of batches
  does not depend on ``num_workers``. Video readers open inside the workers, in a bounded LRU.
- Iterating continues from the current state: after a full pass the epoch advances by one; after a
  ``break`` the next ``for`` picks up at the next unseen sample.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch
import torchdata.nodes as tn

from .collate import collate

STATE_VERSION = 1


class _FetchBatch:
    """Reads the windows of one batch of indices and collates them (runs inside a worker)."""

    def __init__(self, windows, collate_fn: Callable):
        self.windows = windows
        self.collate_fn = collate_fn

    def __call__(self, indices: list[int]) -> dict[str, Any]:
        return self.collate_fn([self.windows[int(i)] for i in indices])


def _prepare_context(name: str) -> None:
    """Workers start from a clean process: ``forkserver`` (default) forks them from a server that has
    imported mmloader once, so starting is fast and no decoder thread of the parent is ever inherited
    (forking a process that runs decord or FFmpeg threads can kill the child)."""
    if name == "forkserver":
        torch.multiprocessing.get_context("forkserver").set_forkserver_preload(["mmloader.windowset", "mmloader.loader"])


def _shutdown(obj: Any, _seen: set | None = None) -> None:
    """Stop every thread and worker process of a torchdata pipeline now (prefetcher first), rather than
    whenever the garbage collector gets to it — an abandoned epoch must not leave workers behind."""
    seen = _seen if _seen is not None else set()
    if obj is None or id(obj) in seen:
        return
    seen.add(id(obj))
    if hasattr(obj, "_shutdown"):
        try:
            obj._shutdown()
        except Exception:  # best effort: shutting down must never mask the loop's own exception
            pass
    for attr in ("root", "_it", "source"):
        _shutdown(getattr(obj, attr, None), seen)


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class WindowLoader:
    """Batches of windows for one rank. ``state_dict()`` / ``load_state_dict()`` resume exactly."""

    def __init__(
        self,
        windows,
        batch_size: int = 32,
        shuffle: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        even_shards: bool = False,
        prefetch: int = 2,
        pin_memory: bool = False,
        collate_fn: Callable = collate,
        multiprocessing_context: str = "forkserver",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (then torch.distributed decides)")
        if rank is None:
            rank, world_size = _dist_rank_world()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.windows = windows
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.even_shards = even_shards
        self.prefetch = prefetch
        self.pin_memory = pin_memory
        self.collate_fn = collate_fn
        self.multiprocessing_context = multiprocessing_context
        self.epoch = 0
        self.offset = 0

    # -- order -----------------------------------------------------------------------------------
    def order(self, epoch: int) -> np.ndarray:
        """This rank's window indices for ``epoch`` (a pure function of seed, epoch, rank, world_size)."""
        n = len(self.windows)
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            perm = np.arange(n)
        share = perm[self.rank :: self.world_size]
        if self.even_shards:
            share = share[: n // self.world_size]
        if self.drop_last:
            share = share[: len(share) // self.batch_size * self.batch_size]
        return share

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        n = len(self.order(self.epoch))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    # -- state -----------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.epoch, self.offset = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_windows": len(self.windows),
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``(epoch, offset)``; refuses a state made for another window set or sharding."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        for key in ("seed", "shuffle", "num_windows", "rank", "world_size"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise ValueError(f"loader state was saved with {key}={state[key]!r}, this loader has {mine!r}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    # -- iteration -------------------------------------------------------------------------------
    def _pipeline(self, indices: np.ndarray) -> tn.BaseNode:
        batches = [indices[i : i + self.batch_size].tolist() for i in range(0, len(indices), self.batch_size)]
        node: tn.BaseNode = tn.IterableWrapper(batches)
        fetch = _FetchBatch(self.windows, self.collate_fn)
        if self.num_workers > 0:
            _prepare_context(self.multiprocessing_context)
            node = tn.ParallelMapper(node, fetch, num_workers=self.num_workers, in_order=True, method="process",
                                     multiprocessing_context=self.multiprocessing_context)
        else:
            node = tn.Mapper(node, fetch)
        if self.pin_memory and torch.cuda.is_available():
            node = tn.PinMemory(node)
        if self.prefetch > 0 and self.num_workers > 0:
            # with num_workers=0 everything stays in the calling thread: no decoder is ever shared
            # between a background thread and the caller
            node = tn.Prefetcher(node, prefetch_factor=self.prefetch)
        return node

    def __iter__(self) -> Iterator[dict[str, Any]]:
        indices = self.order(self.epoch)[self.offset :]
        if len(indices) == 0:
            self.set_epoch(self.epoch + 1)
            indices = self.order(self.epoch)
        loader = tn.Loader(self._pipeline(indices), restart_on_stop_iteration=False)
        try:
            for batch in loader:
                n = len(batch["index"])
                self.offset += n
                yield batch
            self.set_epoch(self.epoch + 1)
        finally:
            _shutdown(loader)
