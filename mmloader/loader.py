"""A resumable, shardable loader with its own small pool of worker processes.

Pipeline: this rank's window order → batches of indices → (parallel) read + collate → pin memory, with up to
``prefetch`` batches queued per worker.

- **Order** is a pure function of ``(seed, epoch)``: a permutation of all windows (or ``0..N-1`` unshuffled);
  rank ``r`` of ``W`` takes ``order[r::W]`` — disjoint shares whose sizes differ by at most one
  (``even_shards=True`` trims every share to the same length). ``shuffle="block"`` (``block_order``) permutes
  blocks of ``block_windows`` consecutive windows, gives each rank every ``W``-th block, and permutes windows
  inside groups of ``buffer_blocks`` of its blocks: reads stay local (each chunk or shard read about once per
  epoch), randomness is bounded by the group.
- **State** is ``(epoch, offset)``, ``offset`` = samples already yielded in this epoch. Resuming starts the
  pipeline at that offset: sample-exact, with any ``num_workers``, and nothing is replayed.
- Workers (processes, started through a ``forkserver`` by default) each read whole batches; results come back
  in order (tensors through shared memory), so the sequence of batches does not depend on ``num_workers``.
  Shuffled, a batch of a set that says where its windows lie (``affinity``: a WindowSet's recordings, a cache's
  shards) is split: each worker reads the windows of its own recordings straight into one shared-memory slot of
  the main process (``mmloader.shared_batch``), so every recording is opened, decoded and cached by one worker
  only; other batches go to the least busy worker; in index order (``shuffle=False``) each worker takes
  contiguous runs of ``run_batches`` batches (at least ``RUN_WINDOWS`` windows; fewer when the pass has fewer
  than ``num_workers`` such runs, so every worker gets one; a set with a ``run_alignment`` — a window cache: its
  shard size — gets runs of whole multiples of it), runs dealt to the workers in turn, and is told its run (``windows.will_read``), so its decode plan reads each recording forward. Without
  workers the whole pass is announced the same way. A block shuffle deals runs of one group
  (``buffer_blocks * block_windows`` windows) the same way, so each worker reads its own blocks.
- Decoder threads: each worker decodes with ``cpus // num_workers`` threads (at least 1; cpus from the
  process's affinity mask), so workers × threads fits the machine; without workers, all of them.
  Video readers open inside the workers, in a bounded LRU. Workers persist across epochs
  (``persistent_workers=True``) and stop when a pass is abandoned (``break``) or fails, on ``close()``, and when
  the loader is garbage-collected.
- **Faults**: a worker that dies (any signal, ``os._exit``, the OOM killer) raises ``WorkerError`` in the loop at
  once, naming the worker, its pid and the batch; an exception raised in a worker reaches the caller with its own
  type and message, the worker's traceback attached as a note. Workers (and the forkserver) never outlive the
  main process: they watch their parent and exit when it is gone.
- **Timeout**: ``timeout=s`` raises ``WorkerError`` when no batch has come back for ``s`` seconds while batches
  are in flight — a worker that is stopped (SIGSTOP, a debugger), deadlocked or stuck in I/O — naming the
  worker(s) and the late batch, and stops the pool. ``None`` (default) waits as long as it takes.
- Iterating continues from the current state: after a full pass the epoch advances by one; after a
  ``break`` the next ``for`` picks up at the next unseen sample.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import itertools
import math
import multiprocessing
import multiprocessing.connection as mpc
import numbers
import os
import pickle
import queue
import select
import signal
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.multiprocessing  # registers the reductions that send tensors through shared memory

from . import shared_batch, shm
from .batch_memory import BatchMemory
from .dist import part_of, rank_world
from .video.backends import cpus_available, set_decoder_threads
from .windows.collate import collate

STATE_VERSION = 1
MAX_WORKERS = 256  # each worker holds 3 file descriptors in the main process and a process of its own
MAX_SEED = 2**63  # seeds are non-negative and fit an int64 (states are saved as plain ints)
_PARENT_POLL_S = 0.2  # how often a worker checks that its parent is still there
_WAIT_S = 5.0  # the longest the loop sleeps before looking at its workers again
RUN_WINDOWS = 128  # shuffle=False with workers: a worker's contiguous run holds at least this many windows
REORDER_SLOTS = 6  # shared-memory slots per worker for batches that wait behind another worker's run (at least)
BLOCK_WINDOWS = 256  # shuffle="block": windows per block when the set has no run_alignment (a cache's shards)
_NO_RUN = object()
SAME_RUN = "same-run"  # a task's run: the worker's current run goes on (sent once per run, not with every batch)


class WorkerError(RuntimeError):
    """A loader worker process died (killed by a signal — e.g. the out-of-memory killer —, ``os._exit``, a crash
    in native code) or could not hand back its batch. The message names the worker, its pid and the batch."""


class _FetchBatch:
    """Reads the windows of one batch of indices and collates them (runs inside a worker)."""

    def __init__(self, windows, collate_fn: Callable):
        self.windows = windows
        self.collate_fn = collate_fn
        self._run: Any = _NO_RUN
        self._batched = callable(getattr(windows, "read_batch", None))
        params = inspect.signature(windows.read_batch).parameters if self._batched else {}
        self._alloc = "alloc" in params
        self._rows = "rows" in params and "size" in params

    def announce(self, run: Sequence[int] | None) -> None:
        """Tell the windows (when they listen: ``will_read``) the run of windows this process reads next."""
        if run is self._run or (run is not None and self._run is not _NO_RUN and run == self._run):
            return
        self._run = run
        hint = getattr(self.windows, "will_read", None)
        if hint is not None:
            hint(run)

    def part(self, indices: list[int], rows: np.ndarray, size: int,
             alloc: Callable[[tuple[int, ...], Any], np.ndarray]) -> dict[str, Any]:
        """Windows ``indices``, part of a batch of ``size`` split across workers (``mmloader.shared_batch``): read
        straight into rows ``rows`` of ``alloc``'s arrays when the set can (``read_batch(rows=, size=)``), else
        the part collated on its own."""
        self.announce(None)
        if self.collate_fn is collate and self._rows:
            out = self.windows.read_batch(indices, alloc=alloc, rows=rows, size=size)
            if out is not None:
                return out
        return self(indices)

    def __call__(self, indices: list[int], run: Sequence[int] | None | object = _NO_RUN,
                 alloc: Callable[[tuple[int, ...], Any], np.ndarray] | None = None) -> dict[str, Any]:
        """The collated batch of ``indices``. ``alloc(shape, dtype)``: where a batch read at once
        (``read_batch``) may put its big arrays (a worker's shared-memory slot), when the set accepts it."""
        if run is not _NO_RUN:
            self.announce(run)  # type: ignore[arg-type]
        if self.collate_fn is collate and self._batched:  # the same batch, read straight into its tensors
            out = self.windows.read_batch(indices, alloc=alloc) if self._alloc else self.windows.read_batch(indices)
            if out is not None:
                return out
        return self.collate_fn([self.windows[int(i)] for i in indices])


def _prepare_context(name: str) -> None:
    """Workers start from a clean process: ``forkserver`` (default) forks them from a server that has
    imported mmloader once, so starting is fast and no decoder thread of the parent is ever inherited
    (forking a process that runs decord or FFmpeg threads can kill the child)."""
    if name == "forkserver":
        torch.multiprocessing.get_context("forkserver").set_forkserver_preload(["mmloader.windows.dataset", "mmloader.loader"])


# -- worker side -------------------------------------------------------------------------------------

def _die_with_parent(main_pid: int, forked_by_server: bool) -> None:
    """A worker never outlives the process that owns the loader. Its parent is the forkserver (which exits as
    soon as the main process is gone: it sees EOF on its lifeline pipe) or the main process itself. On Linux the
    kernel sends SIGKILL when the forkserver dies (``PR_SET_PDEATHSIG``; only there: the forkserver is
    single-threaded, whereas a thread of the main process that started a worker may end before it); everywhere
    a watchdog thread exits when the parent changes (reparenting) or the main process is gone."""
    ppid = os.getppid()
    if forked_by_server and sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except Exception:  # no prctl: the watchdog below still works
            pass

    def watch() -> None:
        while True:
            if os.getppid() != ppid:
                os._exit(1)
            if os.name == "posix":  # (on Windows os.kill(pid, 0) would send CTRL_C_EVENT)
                try:
                    os.kill(main_pid, 0)
                except ProcessLookupError:
                    os._exit(1)
                except OSError:
                    pass
            time.sleep(_PARENT_POLL_S)

    threading.Thread(target=watch, name="mmloader-parent-watch", daemon=True).start()


def _pack_error(e: BaseException) -> dict[str, Any]:
    """An exception, ready to cross the process boundary with its type, message, attributes and traceback."""
    info: dict[str, Any] = {
        "module": type(e).__module__, "qualname": type(e).__qualname__, "message": str(e),
        "attrs": {k: v for k, v in vars(e).items() if isinstance(v, (str, int, float, bool, type(None)))},
        "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__)), "blob": None,
    }
    try:
        blob = pickle.dumps(e)
        back = pickle.loads(blob)  # many exceptions pickle but do not unpickle (extra __init__ arguments)
        if type(back) is type(e) and str(back) == str(e):
            info["blob"] = blob
    except Exception:
        pass
    return info


def _worker_loop(wid: int, main_pid: int, context: str, windows, collate_fn: Callable, tasks, results,
                 threads: int = 1, slots: int = 0, shm_tag: str = "") -> None:
    """Read ``(batch number, indices, run, freed slots)`` from ``tasks`` until ``None`` or EOF; send back
    ``("ok", k, batch)`` or ``("err", k, packed exception)``. ``run``: the windows this worker reads next in this
    order (sent with the run's first batch), ``SAME_RUN`` (it goes on) or None. ``threads``: decoder threads of this
    worker's video readers. ``slots > 0``: batches go through that many shared-memory slots (``mmloader.shm``, files
    tagged ``shm_tag``) as ``("shm", k, slot, path, layout)``; the main process hands slots back with its next task
    to this worker (``freed slots``) once their batches' tensors are gone (no slot free: the batch is pickled), and
    ``("slots", n)`` gives it ``n`` slots for longer runs. Split batches
    (``mmloader.shared_batch``): ``("map", slot, gen, path)`` maps a slot of the main process (answered with
    ``("mapped", slot, gen, error or None)``); ``("part", k, indices, positions, size, slot, gen, placed)`` reads
    this worker's part of batch ``k`` into it, answered with ``("part", k, rest of the part)``."""
    _die_with_parent(main_pid, forked_by_server=context == "forkserver")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's business
    torch.set_num_threads(1)
    set_decoder_threads(threads)
    fetch = _FetchBatch(windows, collate_fn)
    writer = shm.SlotWriter(slots, shm_tag) if slots else None
    parts = shared_batch.PartWriter()
    pending: deque = deque()  # tasks that came while waiting for a free slot
    inbox = _Inbox(tasks)
    try:
        while True:
            msg = pending.popleft() if pending else _taking_frees(writer, inbox.get())
            if msg is None:
                return
            if msg[0] == "slots":
                writer.grow(msg[1])  # type: ignore[union-attr]
                continue
            if msg[0] in ("map", "part"):
                out = _serve_split(fetch, parts, msg)
                if not _send_result(results, out, msg[1] if msg[0] == "part" else -1):
                    return
                continue
            if writer is not None and not _take_frees(writer, inbox, pending):
                return
            if not _send_result(results, _serve_batch(fetch, writer, msg), msg[0]):
                return
    finally:
        parts.close()
        if writer is not None:
            writer.close()


def _serve_batch(fetch: _FetchBatch, writer: "shm.SlotWriter | None", msg: tuple) -> tuple:
    """The answer to task ``(k, indices, run)``: the batch through a free slot of ``writer`` (when there is one),
    else pickled; or the packed error."""
    k, indices, run = msg[:3]
    run = _NO_RUN if run == SAME_RUN else run
    slot = writer.free.pop() if writer is not None and writer.free else None  # none: the caller holds them all
    try:
        batch = fetch(indices, run, alloc=writer.arena(slot) if slot is not None else None)  # type: ignore[union-attr]
        return ("ok", k, batch) if slot is None else ("shm", k, slot, *writer.write(slot, batch))  # type: ignore[union-attr]
    except Exception as e:
        if slot is not None:
            writer.free.append(slot)  # type: ignore[union-attr]
        return ("err", k, _pack_error(e))


def _serve_split(fetch: _FetchBatch, parts: "shared_batch.PartWriter", msg: tuple) -> tuple:
    """The answer to a ``map`` or ``part`` message (see ``_worker_loop``)."""
    if msg[0] == "map":
        _, slot, gen, path = msg
        try:
            parts.map(slot, gen, path)
        except Exception as e:  # the next part that needs this slot fails, naming it
            return ("mapped", slot, gen, _pack_error(e))
        return ("mapped", slot, gen, None)
    _, k, indices, positions, size, slot, gen, placed = msg
    try:
        if slot is None:  # the batch's layout is not known yet: the whole part comes back pickled
            return ("part", k, shared_batch.to_wire(shared_batch.inline(fetch(indices, None))))
        batch = fetch.part(indices, positions, size, parts.alloc(slot, gen, placed))
        return ("part", k, shared_batch.to_wire(parts.write(batch, positions, size, slot, gen, placed)))
    except Exception as e:
        return ("err", k, _pack_error(e))


def _readable(conn: Any) -> bool:
    """Whether ``conn`` has something to receive now (``poll`` on its descriptor — not ``select``, which fails on
    descriptors past 1023, and a process with a window cache open holds thousands —; ``Connection.poll`` builds a
    selector each time, which cost more than taking a batch)."""
    if not hasattr(select, "poll"):
        return conn.poll()
    p = select.poll()
    p.register(conn.fileno(), select.POLLIN)
    return bool(p.poll(0))


class _Inbox:
    """A worker's task pipe, read by a thread of its own into a queue as messages come: the main process never
    blocks writing a task (or a slot handed back) while this worker is busy — or itself blocked handing back a
    batch that the main process will only take once its own write is done (a deadlock once tasks outgrow the
    pipe's buffer: large batches, deep prefetch). ``None`` (stop) when the main process is gone or closed it."""

    def __init__(self, tasks: Any):
        self._tasks, self._queue = tasks, queue.SimpleQueue()
        threading.Thread(target=self._drain, name="mmloader-task-inbox", daemon=True).start()

    def _drain(self) -> None:
        while True:
            try:
                msg = self._tasks.recv()
            except (EOFError, OSError):
                msg = None
            self._queue.put(msg)
            if msg is None:
                return

    def get(self, block: bool = True) -> Any:
        """The next message (``queue.Empty`` when ``block`` is False and there is none)."""
        return self._queue.get(block)


def _taking_frees(writer: "shm.SlotWriter | None", msg: Any) -> Any:
    """``msg``, the slots that a task ``(k, indices, run, freed)`` hands back taken (the task without them)."""
    if msg is None or type(msg[0]) is not int:
        return msg
    if writer is not None:
        writer.free.extend(msg[3])
    return msg[:3]


def _take_frees(writer: "shm.SlotWriter", inbox: _Inbox, pending: deque) -> bool:
    """Take the slots handed back so far (without waiting) — with the tasks that came meanwhile, which are kept for
    later, and ``slots`` messages; False on stop."""
    while True:
        try:
            msg = _taking_frees(writer, inbox.get(block=False))
        except queue.Empty:
            return True
        if msg is None:
            pending.append(None)  # the stop, after the tasks that came before it
            return False
        if msg[0] == "slots":
            writer.grow(msg[1])
        else:
            pending.append(msg)


def _send_result(results, out: tuple, k: int) -> bool:
    """Send ``out``; False when the main process is gone or has closed the pool."""
    try:
        try:
            results.send(out)
        except (OSError, EOFError):
            raise
        except Exception as e:  # the batch itself cannot be pickled
            results.send(("err", k, _pack_error(e)))
    except (OSError, EOFError):
        return False
    return True


# -- main side ---------------------------------------------------------------------------------------

def _unpack_error(info: dict[str, Any], where: str) -> BaseException:
    """The worker's exception with its own type and message; ``where`` and the worker's traceback as a note."""
    exc: BaseException | None = None
    if info["blob"] is not None:
        try:
            exc = pickle.loads(info["blob"])
        except Exception:
            exc = None
    if exc is None:
        try:
            cls: Any = importlib.import_module(info["module"])
            for part in info["qualname"].split("."):
                cls = getattr(cls, part)
            if isinstance(cls, type) and issubclass(cls, Exception):
                exc = cls.__new__(cls, info["message"])  # skips an __init__ with other arguments
                exc.args = (info["message"],)
                exc.__dict__.update(info["attrs"])
                if str(exc) != info["message"]:
                    exc = None
        except Exception:
            exc = None
    if exc is None:
        exc = RuntimeError(f"{info['module']}.{info['qualname']}: {info['message']}")
    note = f"raised in {where}; the worker's traceback:\n{info['traceback'].rstrip()}"
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # Python 3.10
        exc.__cause__ = RuntimeError(note)
    return exc


def _short(indices: list[int], n: int = 16) -> str:
    return str(indices) if len(indices) <= n else f"[{', '.join(map(str, indices[:n]))}, ... {len(indices)} in all]"


_PROC_STATES = {"R": "running", "S": "sleeping", "D": "in uninterruptible sleep (I/O)", "T": "stopped",
                "t": "stopped by a debugger", "Z": "exited", "X": "exited"}


def _state(pid: int) -> str:
    """A process's scheduler state, from /proc (Linux); 'state unknown' elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        code = stat[stat.rindex(")") + 2]
    except (OSError, ValueError, IndexError):
        return "state unknown"
    return _PROC_STATES.get(code, f"state {code}")


def _how(exitcode: int | None) -> str:
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Assembly:
    """A split batch on its way: ``n`` windows, its shared slot and arrays' places, each worker's batch positions,
    and the parts received so far ``(positions, part)``."""

    def __init__(self, n: int, slot: int, placed: list, positions: dict[int, np.ndarray]):
        self.n, self.slot, self.placed, self.positions = n, slot, placed, positions
        self.got: list[tuple[np.ndarray, dict]] = []


class _WorkerPool:
    """``num_workers`` processes, each with its own task pipe and result pipe. Batches are handed out to the
    least busy worker (at most ``per_worker`` queued each) and yielded in batch order, so what comes out does
    not depend on the number of workers. The loop waits on the result pipes *and* the processes' sentinels: a
    worker that dies for any reason raises ``WorkerError`` at once, naming it and its batch."""

    def __init__(self, windows, collate_fn: Callable, num_workers: int, context: str, per_worker: int,
                 timeout: float | None = None):
        _prepare_context(context)
        ctx = torch.multiprocessing.get_context(context)
        self.per_worker = max(1, per_worker)
        self.timeout = timeout
        self.late: dict[int, str] = {}  # worker -> what it was doing when the watchdog stopped it
        self.procs: list[Any] = []
        self.tasks: list[Any] = []
        self.results: list[Any] = []
        self.inflight: list[deque] = []
        self.broken = False
        main_pid = os.getpid()
        threads = max(1, cpus_available() // max(1, num_workers))
        # batches through reused shared-memory slots (mmloader.shm); else pickled (tensors in fresh segments).
        # Beyond the queued ones: the batch the caller holds, one freed but not yet handed back, and REORDER_SLOTS
        # for batches of a worker's run that wait (in order) behind another worker's run (see _dispatch)
        self.slots = self.per_worker + 2 + REORDER_SLOTS if shm.available() else 0
        slots = self.slots
        self._freed: deque = deque()  # (worker, slot) whose batch the caller no longer holds: to hand back
        self._unsent: list[list[int]] = [[] for _ in range(num_workers)]  # freed slots, sent with the next task
        token = f"{main_pid}-{os.urandom(4).hex()}"  # this pool's slot files: mmloader-<token>-<worker>-...
        self.readers: list[shm.SlotReader] = []
        # shuffled batches split by storage affinity across the workers (mmloader.shared_batch), when the set says
        # where its windows lie and batches are read whole (read_batch) and collated the default way
        self.windows = windows
        self.layout: shared_batch.Layout | None = None
        self.assembling: dict[int, _Assembly] = {}
        self._poller: Any = None  # (see _wait)
        self._by_fd: dict[int, Any] = {}
        self.shared = (shared_batch.SharedSlots(f"{token}-s", num_workers,
                                                self.per_worker * num_workers + 2 + REORDER_SLOTS)
                       if num_workers >= 2 and self.slots and collate_fn is collate
                       and callable(getattr(windows, "affinity", None)) and callable(getattr(windows, "read_batch", None))
                       else None)
        try:
            for i in range(num_workers):
                task_r, task_w = ctx.Pipe(duplex=False)
                res_r, res_w = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_worker_loop, name=f"mmloader-worker-{i}", daemon=True,
                                args=(i, main_pid, context, windows, collate_fn, task_r, res_w, threads, slots,
                                      f"{token}-{i}"))
                p.start()
                task_r.close()
                res_w.close()
                self.procs.append(p)
                self.tasks.append(task_w)
                self.results.append(res_r)
                self.inflight.append(deque())
                self.readers.append(shm.SlotReader(f"{token}-{i}"))
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def idle_and_alive(self) -> bool:
        return not self.broken and all(not q for q in self.inflight) and all(p.exitcode is None for p in self.procs)

    def _death(self, i: int, detail: str = "") -> WorkerError:
        if i in self.late:  # killed by the timeout's watchdog, not by anyone else
            return self._late_in_io(i)
        self.broken = True
        p = self.procs[i]
        p.join(0.5)
        q = list(self.inflight[i])
        if q:
            what = f"before handing back batch {q[0][0]} of this pass (windows {_short(q[0][1])})"
            if len(q) > 1:
                what += "; also assigned to it: " + ", ".join(f"batch {k} (windows {_short(idx)})" for k, idx in q[1:])
        else:
            what = "with no batch in flight"
        hint = ("; SIGKILL is often the out-of-memory killer: lower num_workers, batch_size or reader_capacity"
                if p.exitcode is not None and p.exitcode == -getattr(signal, "SIGKILL", -1) else "")
        return WorkerError(f"loader worker {i} (pid {p.pid}) {_how(p.exitcode)} {what}{detail}{hint}")

    def _in_flight(self, skip: int | None = None) -> str:
        rest = [f"worker {j} (pid {self.procs[j].pid}, {_state(self.procs[j].pid)}): "
                + ", ".join(f"batch {k}" for k, _ in q) for j, q in enumerate(self.inflight) if q and j != skip]
        return "; in flight on " + "; ".join(rest) if rest else ""

    def _late(self, k: int, what: str = "") -> WorkerError:
        """No batch came back for ``timeout`` seconds while batch ``k`` (at least) was in flight."""
        self.broken = True
        i = next((j for j, q in enumerate(self.inflight) if any(b == k for b, _ in q)), None)
        if i is None:  # cannot happen: the batch waited for is always in flight
            who, idx = "no worker", ""
        else:
            pid = self.procs[i].pid
            idx = next(f" (windows {_short(x)})" for b, x in self.inflight[i] if b == k)
            who = f"loader worker {i} (pid {pid}, {_state(pid)})"
        return WorkerError(f"{who} has not handed back batch {k} of this pass{idx}{what}: no batch came back from "
                           f"any worker for {self.timeout:g} s (timeout={self.timeout:g}){self._in_flight(i)}; "
                           f"the pool was stopped")

    def _guarded(self, i: int, what: str, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` on worker ``i``'s pipe; with a timeout, a watchdog kills worker ``i`` if it takes longer
        (a worker stopped half-way through a send, or before the main process fetched its tensors' shared memory,
        would otherwise block this call forever), so the call fails and the caller raises the timeout."""
        if self.timeout is None:
            return fn(*args)
        proc = self.procs[i]

        def fire() -> None:
            self.late[i] = what
            try:
                proc.kill()
            except Exception:
                pass

        timer = threading.Timer(self.timeout, fire)
        timer.daemon = True
        timer.start()
        try:
            return fn(*args)
        finally:
            timer.cancel()

    def _late_in_io(self, i: int) -> WorkerError:
        self.broken = True
        q = self.inflight[i]
        batch = f"batch {q[0][0]} of this pass (windows {_short(q[0][1])})" if q else "a batch"
        return WorkerError(f"loader worker {i} (pid {self.procs[i].pid}) did not finish {self.late[i]} within "
                           f"{self.timeout:g} s (timeout={self.timeout:g}) while {batch} was in flight; it was "
                           f"killed{self._in_flight(i)}; the pool was stopped")

    def _take(self, i: int, msg: tuple, buffer: dict) -> None:
        kind, k = msg[0], msg[1]
        if kind == "mapped":  # a worker mapped a slot for split batches
            self.shared.acked(msg[1], msg[2])  # type: ignore[union-attr]
            return
        q = self.inflight[i]
        idx = q.popleft()[1] if q and q[0][0] == k else None
        if kind == "ok":
            buffer[k] = msg[2]
        elif kind == "shm":  # the batch's tensors view the worker's slot; it goes back when they are gone
            _, _, slot, path, layout = msg
            buffer[k] = self.readers[i].read(slot, path, layout, functools.partial(self._freed.append, (i, slot)))
        elif kind == "part":
            self._take_part(i, k, shared_batch.from_wire(msg[2]), buffer)
            return
        else:
            where = f"loader worker {i} (pid {self.procs[i].pid}) while reading batch {k} of this pass (windows {idx})"
            self.assembling.pop(k, None)  # a split batch fails with its first failed part
            buffer[k] = _Failure(_unpack_error(msg[2], where))
            return
        self._learn(buffer[k])

    def _learn(self, batch: Any) -> None:
        """The layout of split batches, from the first batch that comes back; no layout (nothing big, or not one
        batch dimension throughout): batches are no longer split."""
        if self.shared is not None and self.layout is None:
            self.layout = shared_batch.Layout.from_batch(batch)
            if self.layout is None:
                self.shared.close()
                self.shared = None

    def _take_part(self, i: int, k: int, part: dict, buffer: dict) -> None:
        """Worker ``i``'s part of split batch ``k``; the batch, once every part is in."""
        a = self.assembling.get(k)
        if a is None:  # another part of this batch failed already
            return
        a.got.append((a.positions[i], part))
        if len(a.got) < len(a.positions):
            return
        del self.assembling[k]
        a.got.sort(key=lambda g: int(g[0][0]))
        try:
            views = {} if a.slot is None else self.shared.views(a.slot, a.placed)  # type: ignore[union-attr]
            buffer[k] = shared_batch.merge(a.got, a.n, views)
        except Exception as e:
            buffer[k] = _Failure(e)
            return
        self._learn(buffer[k])

    def _hand_back_slots(self) -> None:
        """Note which of the workers' slots are free again (the batches there are no longer referenced), to go with
        each worker's next task: a worker needs a slot only for a task, and one message a batch wakes it once."""
        while self._freed:
            i, slot = self._freed.popleft()
            if i < len(self._unsent):
                self._unsent[i].append(slot)

    def _receive(self, buffer: dict, timeout: float) -> int:
        """Waits up to ``timeout`` s; takes what has come back; returns how many messages that was."""
        self._hand_back_slots()
        by_conn = {c: i for i, c in enumerate(self.results)}
        by_sentinel = {p.sentinel: i for i, p in enumerate(self.procs)}
        ready = self._wait(by_conn, by_sentinel, timeout)
        dead = []
        got = 0
        for r in ready:
            if r in by_conn:
                i = by_conn[r]
                try:
                    while True:
                        self._take(i, self._guarded(i, "handing back its batch", r.recv), buffer)
                        got += 1
                        if not _readable(r):
                            break
                except (EOFError, OSError) as e:  # pipe closed, or the batch's shared memory went with the worker
                    if i in self.late:
                        raise self._late_in_io(i) from None
                    dead.append((i, "" if isinstance(e, EOFError) else f" (receiving its batch failed: {e})"))
                except Exception as e:  # a batch that does not unpickle here
                    if i in self.late:
                        raise self._late_in_io(i) from e
                    self.broken = True
                    q = self.inflight[i]
                    what = f"batch {q[0][0]} (windows {_short(q[0][1])})" if q else "a batch"
                    raise WorkerError(f"could not receive {what} from loader worker {i} (pid {self.procs[i].pid}): "
                                      f"{type(e).__name__}: {e}") from e
            else:
                dead.append((by_sentinel[r], ""))
        for i, detail in dead:
            raise self._death(i, detail)
        return got

    def _wait(self, by_conn: dict, by_sentinel: dict, timeout: float) -> list:
        """The result pipes and process sentinels that are ready within ``timeout`` s: through one ``poll`` object
        kept for the pool where the platform has it (registering every pipe anew for each wait cost more than
        handing a batch over), else ``multiprocessing.connection.wait``."""
        if not hasattr(select, "poll"):
            return mpc.wait(list(by_conn) + list(by_sentinel), timeout=timeout)
        if self._poller is None:
            self._poller, self._by_fd = select.poll(), {}
            for obj in [*by_conn, *by_sentinel]:
                fd = obj if isinstance(obj, int) else obj.fileno()
                self._poller.register(fd, select.POLLIN)
                self._by_fd[fd] = obj
        return [self._by_fd[fd] for fd, _ in self._poller.poll(None if timeout is None else timeout * 1000)
                if fd in self._by_fd]

    def _send(self, i: int, task: tuple, entry: tuple | None = None) -> None:
        """Hand ``task`` = (batch number, indices, run) to worker ``i``, with the slots it got back since its last
        task (``entry``: what a task of another form is in flight as: ``(batch number, indices)``)."""
        self.inflight[i].append(task[:2] if entry is None else entry)
        if entry is None:
            task, self._unsent[i] = (*task, tuple(self._unsent[i])), []
        try:
            self._guarded(i, "taking its next task", self.tasks[i].send, task)
        except (OSError, EOFError):
            if i in self.late:
                raise self._late_in_io(i) from None
            raise self._death(i) from None

    def _dispatch(self, todo: deque | list[deque], k: int, block: int, buffer: dict | None = None) -> None:
        """Hand out tasks. ``block == 0``: ``todo`` is one queue, each task split across the workers
        (``_send_split``) or to the least busy worker, none more than ``per_worker × workers`` batches ahead of
        batch ``k`` (those read and waiting in ``buffer`` count: a slow consumer never makes it grow). Else ``todo``
        holds one queue per worker (batch j belongs to worker ``(j // block) % workers``); a worker takes its own
        tasks, none beyond the round of blocks after the next one from batch ``k`` (awaited; so a worker that is
        done with its block while batch ``k``'s worker is not can go on with its next one), and (with
        shared-memory slots) none while its queued and received-but-waiting batches would fill its slots, so its
        batches never fall back to pickling while they wait for their turn."""
        self._hand_back_slots()
        if block:
            limit = (k // block + len(self.procs) + 1) * block
            waiting = [0] * len(self.procs)
            for j in buffer or ():
                waiting[(j // block) % len(self.procs)] += 1
            cap = self.slots - 2 if self.slots else None  # the caller's batch and one freed after this task
            for i, mine in enumerate(todo):
                while mine and mine[0][0] < limit and len(self.inflight[i]) < self.per_worker and \
                        (cap is None or len(self.inflight[i]) + waiting[i] < cap):
                    self._send(i, mine.popleft())
            return
        ahead = self.per_worker * len(self.procs)  # batches read ahead of the one awaited, at most (with the buffer)
        while todo and todo[0][0] - k < ahead:
            if self.shared is not None:
                sent = self._send_split(todo[0])
                if sent is None:  # a worker with a part of it is busy: wait
                    return
                if sent:
                    todo.popleft()
                    continue
            i = min(range(len(self.procs)), key=lambda j: len(self.inflight[j]))
            if len(self.inflight[i]) >= self.per_worker:
                return
            self._send(i, todo[0])
            todo.popleft()

    def _send_split(self, task: tuple) -> bool | None:
        """Hand each worker its part of batch ``task`` (``mmloader.shared_batch``): True when sent; None when a
        worker with a part has no room yet; False when the batch is to be read whole (parts too uneven, or every
        shared slot still held by the caller's batches)."""
        k, indices, _ = task
        keys = np.asarray(self.windows.affinity(indices))
        if keys.shape != (len(indices),) or keys.dtype.kind not in "iu":
            raise ValueError(f"{type(self.windows).__name__}.affinity(indices) must return one integer per window "
                             f"(shape ({len(indices)},)), got {keys.dtype} of shape {keys.shape}")
        parts = shared_batch.split(keys, len(self.procs))
        if parts is None:
            return False
        busy = [i for i, p in enumerate(parts) if len(p)]
        room = self.per_worker * len(self.procs)  # parts are 1/W of a batch: as much queued as whole batches
        if any(len(self.inflight[i]) >= room for i in busy):
            return None
        if self.layout is None:  # the first batches: parts sent back whole, stacked here, the layout learnt
            placed, (slot, gen, path) = [], (None, None, None)
        else:
            placed, nbytes = self.layout.place(len(indices))
            got = self.shared.take(nbytes)  # type: ignore[union-attr]
            if got is None:
                return False
            slot, gen, path = got
        if path is not None:  # a new file: every worker maps it before any part that writes there
            for i in range(len(self.procs)):
                self._send_control(i, ("map", slot, gen, path))
        arr = np.asarray(indices)
        self.assembling[k] = _Assembly(len(indices), slot, placed, {i: parts[i] for i in busy})
        for i in busy:
            mine = arr[parts[i]].tolist()
            self._send(i, ("part", k, mine, parts[i].tolist(), len(indices), slot, gen, placed), entry=(k, mine))
        return True

    def _tasks(self, batches: Sequence[list[int]], block: int) -> deque | list[deque]:
        if not block:
            return deque((k, b, None) for k, b in enumerate(batches))
        queues: list[deque] = [deque() for _ in self.procs]
        for start in range(0, len(batches), block):
            run = list(itertools.chain.from_iterable(batches[start: start + block]))
            for k in range(start, min(start + block, len(batches))):  # the run itself with its first batch only
                queues[(start // block) % len(self.procs)].append((k, batches[k], run if k == start else SAME_RUN))
        return queues

    def _slots_for(self, block: int) -> None:
        """With runs of ``block`` batches, give every worker room (slots) for two of its runs waiting in order behind
        the others' — so the cap in ``_dispatch`` never holds a worker back before the old lookahead would — besides
        its queue. Slots are made on first use and reused last-in first-out: unused ones cost nothing."""
        want = self.per_worker + 2 + max(REORDER_SLOTS, 2 * block)
        if not self.slots or want <= self.slots:
            return
        for i in range(len(self.procs)):
            self._send_control(i, ("slots", want))
        self.slots = want

    def _send_control(self, i: int, msg: tuple) -> None:
        try:
            self._guarded(i, "taking a message", self.tasks[i].send, msg)
        except (OSError, EOFError, ValueError):  # that worker is gone: the next receive reports it
            pass

    def run(self, batches: Sequence[list[int]], block: int = 0) -> Iterator[dict[str, Any]]:
        """The batches' results, in order. ``block > 0``: contiguous runs of ``block`` batches, dealt to the
        workers in turn, each worker told its run (for index-order reading); 0: the least busy worker, no run."""
        if block:
            self._slots_for(block)
        todo = self._tasks(batches, block)
        buffer: dict[int, Any] = {}
        for k in range(len(batches)):
            self._dispatch(todo, k, block, buffer)
            since = time.monotonic()  # the last time a batch came back (or the wait began)
            while k not in buffer:
                left = None if self.timeout is None else since + self.timeout - time.monotonic()
                if left is not None and left <= 0:
                    raise self._late(k)
                if self._receive(buffer, _WAIT_S if left is None else min(_WAIT_S, left)):
                    since = time.monotonic()
                if block:
                    self._dispatch(todo, k, block, buffer)  # keep the other workers busy on their runs
            self._receive(buffer, 0)  # a worker that died meanwhile is an error now, not at the end
            out = buffer.pop(k)
            if isinstance(out, _Failure):
                self.broken = True
                raise out.exc
            yield out

    def close(self) -> None:
        """Stop the workers: politely when they are idle, otherwise at once (SIGTERM, then SIGKILL)."""
        polite = self.idle_and_alive()
        for c in self.tasks:
            try:
                if polite:
                    c.send(None)
            except Exception:
                pass
        if polite:
            deadline = time.monotonic() + 2.0
            for p in self.procs:
                p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.exitcode is None:
                p.terminate()
                if hasattr(signal, "SIGCONT"):  # a stopped worker handles its SIGTERM only once it runs again
                    try:
                        os.kill(p.pid, signal.SIGCONT)
                    except OSError:
                        pass
        for p in self.procs:
            p.join(2.0)
            if p.exitcode is None:
                p.kill()
                p.join()
        for c in self.tasks + self.results:
            try:
                c.close()
            except Exception:
                pass
        for r in getattr(self, "readers", []):
            r.close()
        if getattr(self, "shared", None) is not None:
            self.shared.close()
        self.procs, self.tasks, self.results, self.inflight, self.readers = [], [], [], [], []


def _aligned(block: int, batch_size: int, alignment: int) -> int:
    """``block`` batches rounded up so that a run holds a whole number of ``alignment`` windows (a window cache's
    shards: then no shard is split between two workers, which would each decode it)."""
    if alignment <= 1:
        return block
    unit = alignment // math.gcd(alignment, batch_size)  # batches per aligned run
    return -(-block // unit) * unit


def block_order(n: int, block_windows: int, buffer_blocks: int, seed: int, epoch: int, rank: int = 0,
                world_size: int = 1) -> tuple[np.ndarray, int]:
    """Rank ``rank``'s share of a block-shuffled epoch over windows ``0..n-1``, and the shortest share's length.

    ``0..n-1`` is cut into blocks of ``block_windows`` consecutive windows (the last may be shorter); the blocks
    are permuted (seeded by ``(seed, epoch)``); rank ``r`` of ``W`` takes every ``W``-th block of that list from
    the ``r``-th on (disjoint blocks); its blocks, in groups of ``buffer_blocks`` (the last group also takes the
    remainder: up to ``2 * buffer_blocks - 1`` blocks), have the windows inside each group permuted (a window's
    sort key depends only on ``(seed, epoch)`` and the window). Pure function of its arguments; every window of
    the rank's blocks appears exactly once.
    """
    rng = np.random.default_rng([seed, epoch])
    n_blocks = -(-n // block_windows)
    perm = rng.permutation(n_blocks)
    keys = rng.random(n)  # drawn for all windows, so a window's key does not depend on the sharding
    sizes = np.minimum((perm + 1) * block_windows, n) - perm * block_windows  # in permuted order
    shares = np.bincount(np.arange(n_blocks) % world_size, weights=sizes, minlength=world_size)
    mine = perm[rank::world_size]
    size = sizes[rank::world_size]
    # the windows of this rank's blocks, block after block: each block's start, repeated, plus 0, 1, 2, ...
    first = np.cumsum(size) - size
    idx = np.repeat(mine * block_windows - first, size) + np.arange(int(size.sum()), dtype=np.int64)
    last = max(0, len(mine) // buffer_blocks - 1)  # a short tail joins the last whole group
    group = np.repeat(np.minimum(np.arange(len(mine)) // buffer_blocks, last), size)
    return idx[np.lexsort((keys[idx], group))], int(shares.min())


def _pin(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: _pin(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in batch):
        return type(batch)(_pin(v) for v in batch)
    return batch


def _integer(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    """``value`` as a Python int (numpy integers too; never a bool, float or string) in ``[lo, hi]``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f">= {lo} and <= {hi}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def _shuffle(value: Any) -> bool | str:
    """``True``/``False`` (numpy bools too) or the string ``"block"``."""
    if isinstance(value, str) and value == "block":
        return "block"
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"shuffle must be True or False, got {type(value).__name__} {value!r} (or 'block': a block "
                        "shuffle)")
    return bool(value)


def _timeout(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds or None, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"timeout must be a finite number of seconds > 0 (or None: wait forever), got {value!r}")
    return value


def _context(value: Any) -> str:
    methods = multiprocessing.get_all_start_methods()
    if not isinstance(value, str):
        raise TypeError(f"multiprocessing_context must be one of {methods}, got {type(value).__name__} {value!r}")
    if value not in methods:
        raise ValueError(f"multiprocessing_context must be one of {methods} (the start methods of this platform), "
                         f"got {value!r}")
    return value


def _blocks(windows, block_windows: Any, buffer_blocks: Any, shuffle: bool | str, world_size: int) -> tuple[int, int]:
    """``(block_windows, buffer_blocks)`` checked, ``block_windows`` resolved (``None``: the set's
    ``run_alignment`` when > 1, else ``BLOCK_WINDOWS``)."""
    buffer_blocks = _integer("buffer_blocks", buffer_blocks, 1)
    if block_windows is None:
        align = getattr(windows, "run_alignment", None)
        ok = isinstance(align, numbers.Integral) and not isinstance(align, (bool, np.bool_)) and align > 1
        block_windows = int(align) if ok else BLOCK_WINDOWS
    block_windows = _integer("block_windows", block_windows, 1)
    n = len(windows)
    if shuffle == "block" and 0 < -(-n // block_windows) < world_size:
        raise ValueError(f"block_windows={block_windows} cuts the {n} windows into {-(-n // block_windows)} blocks, "
                         f"fewer than world_size ({world_size}): some ranks would get no windows; choose a smaller "
                         "block_windows")
    return block_windows, buffer_blocks


class WindowLoader:
    """Batches of windows for one rank. ``state_dict()`` / ``load_state_dict()`` resume exactly.

    Arguments are checked up front; a wrong one raises ``TypeError`` (wrong type: integers may be Python or numpy
    integers, never bools, floats or strings) or ``ValueError`` (out of range), the message starting with its name:
    ``batch_size >= 1``; ``num_workers`` in ``[0, MAX_WORKERS]`` (256); ``prefetch >= 1`` (batches queued per
    worker; unused without workers, but checked all the same); ``seed`` in ``[0, 2**63)``; ``rank`` in
    ``[0, world_size)``, ``world_size >= 1``, both or neither; ``timeout`` ``None`` or a finite number of seconds
    ``> 0``; ``multiprocessing_context`` one of this platform's start methods; the flags ``True``/``False``;
    ``collate_fn`` callable; ``shuffle`` ``True``, ``False`` or ``"block"``; ``block_windows`` ``None`` or ``>= 1``
    and ``buffer_blocks >= 1`` (checked whatever ``shuffle`` is; used by ``"block"`` only); a block shuffle needs
    at least ``world_size`` blocks (``ValueError`` naming ``block_windows`` otherwise).

    ``shuffle="block"`` (see ``block_order``): blocks of ``block_windows`` consecutive windows (default: the set's
    ``run_alignment`` when it has one > 1 — a window cache's shard size —, else ``BLOCK_WINDOWS``), the blocks
    permuted, ranks taking disjoint blocks, windows permuted within groups of ``buffer_blocks`` of a rank's blocks.
    """

    def __init__(
        self,
        windows,
        batch_size: int = 32,
        shuffle: bool | str = False,
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
        persistent_workers: bool = True,
        timeout: float | None = None,
        block_windows: int | None = None,
        buffer_blocks: int = 8,
    ):
        if not (hasattr(windows, "__len__") and hasattr(windows, "__getitem__")):
            raise TypeError(f"windows must support len() and indexing (a WindowSet), got {type(windows).__name__}")
        batch_size = _integer("batch_size", batch_size, 1)
        shuffle = _shuffle(shuffle)
        seed = _integer("seed", seed, 0, MAX_SEED - 1)
        num_workers = _integer("num_workers", num_workers, 0, MAX_WORKERS)
        drop_last = _flag("drop_last", drop_last)
        even_shards = _flag("even_shards", even_shards)
        prefetch = _integer("prefetch", prefetch, 1)
        pin_memory = _flag("pin_memory", pin_memory)
        persistent_workers = _flag("persistent_workers", persistent_workers)
        if not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable, got {type(collate_fn).__name__} {collate_fn!r}")
        multiprocessing_context = _context(multiprocessing_context)
        timeout = _timeout(timeout)
        if (rank is None) != (world_size is None):
            raise ValueError("rank and world_size must be given together, or neither (then torch.distributed "
                             f"decides); got rank={rank!r}, world_size={world_size!r}")
        if rank is None:
            rank, world_size = rank_world()
        world_size = _integer("world_size", world_size, 1)
        rank = _integer("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
        block_windows, buffer_blocks = _blocks(windows, block_windows, buffer_blocks, shuffle, world_size)
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
        self.persistent_workers = persistent_workers
        self.timeout = timeout
        self.block_windows = block_windows
        self.buffer_blocks = buffer_blocks
        # shuffle=False with workers: batches per contiguous run of one worker (an attribute, may be changed)
        self.run_batches = max(1, -(-int(getattr(windows, "run_windows", RUN_WINDOWS)) // batch_size))
        self._pool: _WorkerPool | None = None
        self._finalizer: weakref.finalize | None = None
        self._memory = BatchMemory()  # batches read in this process (0 workers) reuse their buffers
        self.epoch = 0
        self.offset = 0

    # -- order -----------------------------------------------------------------------------------
    def order(self, epoch: int) -> np.ndarray:
        """This rank's window indices for ``epoch`` (a pure function of seed, epoch, rank, world_size and, for
        ``shuffle="block"``, block_windows and buffer_blocks). ``even_shards`` trims every share to the shortest's
        length: ``n // world_size`` by index; by block, the shortest rank's blocks (each rank drops fewer than
        ``2 * block_windows`` windows: the last ones of its order)."""
        n = len(self.windows)
        if self.shuffle == "block":
            share, shortest = block_order(n, self.block_windows, self.buffer_blocks, self.seed, epoch, self.rank,
                                          self.world_size)
        else:
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            share, shortest = perm[self.rank :: self.world_size], n // self.world_size
        if self.even_shards:
            share = share[:shortest]
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
        self.epoch, self.offset = _integer("epoch", epoch, 0), 0

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
            "block_windows": self.block_windows,
            "buffer_blocks": self.buffer_blocks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``(epoch, offset)``; refuses a state made for another window set or sharding."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        blocks = ("block_windows", "buffer_blocks") if self.shuffle == "block" else ()
        for key in ("seed", "shuffle", "num_windows", "rank", "world_size", *blocks):
            mine = self.state_dict()[key]
            if state[key] != mine:  # a missing key is a KeyError naming it
                raise ValueError(f"loader state was saved with {key}={state[key]!r}, this loader has {mine!r}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    # -- iteration -------------------------------------------------------------------------------
    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the live worker pool ([] when there is none)."""
        return [] if self._pool is None else self._pool.pids

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is garbage-collected)."""
        if self._finalizer is not None:
            self._finalizer()
        self._pool = self._finalizer = None

    def _get_pool(self) -> _WorkerPool:
        if self._pool is not None and not self._pool.idle_and_alive():
            self.close()  # a worker died between epochs, or the last pass ended early: start afresh
        if self._pool is None:
            self._pool = _WorkerPool(self.windows, self.collate_fn, self.num_workers, self.multiprocessing_context,
                                     per_worker=self.prefetch, timeout=self.timeout)
            self._finalizer = weakref.finalize(self, _WorkerPool.close, self._pool)
        return self._pool

    def _run_length(self, n_batches: int) -> int:
        """Batches per contiguous run of one worker (the pool's ``block``); 0: each batch to the least busy worker
        (full permutation). Index order: ``run_batches`` rounded up to whole ``run_alignment`` windows; block
        shuffle: one group (``buffer_blocks * block_windows`` windows), so each worker reads its own blocks. Both
        shorter when the pass is short, so that every worker gets a run."""
        if self.shuffle is True:
            return 0
        per_worker = -(-n_batches // self.num_workers)
        if self.shuffle == "block":
            return max(1, min(-(-self.block_windows * self.buffer_blocks // self.batch_size), per_worker))
        block = max(1, min(self.run_batches, per_worker))
        return _aligned(block, self.batch_size, getattr(self.windows, "run_alignment", 1))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        indices = self.order(self.epoch)[self.offset :]
        if len(indices) == 0:
            self.set_epoch(self.epoch + 1)
            indices = self.order(self.epoch)
        batches = [indices[i : i + self.batch_size].tolist() for i in range(0, len(indices), self.batch_size)]
        if self.num_workers > 0:
            source = self._get_pool().run(batches, self._run_length(len(batches)))
        else:  # everything in the calling thread: no decoder is ever shared with a background thread
            fetch = _FetchBatch(self.windows, self.collate_fn)
            fetch.announce(None if self.shuffle else indices.tolist())
            memory = self._memory
            source = (fetch(b, alloc=memory.arena()) for b in batches)
        pin = self.pin_memory and torch.cuda.is_available()
        finished = False
        try:
            for batch in source:
                if pin:
                    batch = _pin(batch)
                done = batch["index"]
                self.offset += done.shape[0] if isinstance(done, torch.Tensor) else len(done)  # (Tensor.__len__: slow)
                yield batch
            finished = True
            self.set_epoch(self.epoch + 1)
        finally:
            source.close()
            if self.num_workers > 0 and (not finished or not self.persistent_workers):
                self.close()  # an abandoned or failed pass stops its workers now


# -- building a window cache with workers ----------------------------------------------------------------------------


def _indices_only(samples: list[dict[str, Any]]) -> dict[str, list[int]]:
    """A collate function that sends back only the windows' indices (the cache keeps their data)."""
    return {"index": [int(s["index"]) for s in samples]}


class _WindowRange:
    """Windows ``[start, stop)`` of ``windows`` as a set of their own (``r[i]`` is ``windows[start + i]``, the
    sample keeping its own ``index``): what one rank of a sharded cache build reads. ``start`` is a multiple of the
    set's ``run_alignment``, so its workers' runs stay whole shards."""

    def __init__(self, windows, start: int, stop: int):
        self.windows, self.start, self.stop = windows, int(start), int(stop)
        self.run_alignment = int(getattr(windows, "run_alignment", 1))

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= int(i) < len(self):
            raise IndexError(f"window {i} of a range of {len(self)}")
        return self.windows[self.start + int(i)]

    def will_read(self, indices: Sequence[int] | None) -> None:
        hint = getattr(self.windows, "will_read", None)
        if hint is not None:
            hint(None if indices is None else [self.start + int(i) for i in indices])


def _shards_complete(cache, shards: range) -> int:
    """How many of ``shards`` are complete (commit present and matching; checksums not read)."""
    return sum(cache.verify_shard(k, deep=False)[0] == "complete" for k in shards)


def fill_cache(cached, num_workers: int = 0, progress: bool = True, rank: int = 0,
               world_size: int = 1) -> dict[str, int]:
    """Build every missing, torn or corrupt shard of ``cached`` (a ``CachedWindows``) that belongs to this rank
    now; returns the counts of ``WindowCache.fill`` plus ``filled_by_workers`` (shards), ``rank``, ``world_size``
    and ``first_shard``/``stop_shard`` (this rank's ``[first, stop)``).

    **Ranks.** ``rank``/``world_size`` default to ``(0, 1)``: this process builds everything (the CLI takes them from
    ``--rank/--world-size`` or the launcher, ``mmloader.dist.launch_rank_world``). Rank ``r`` of ``W`` fills the
    contiguous shards ``mmloader.dist.part_of(n_shards, r, W)`` — disjoint, so no lock is needed, also on object
    stores — and nothing else; shards are written whole (see ``mmloader.cache.publish``), so a rank that dies
    leaves shards that a rerun (of that rank, or with any world size) completes, and the cache is the same as a
    one-process build's. With an initialised process group, every rank returns once all ranks are done.

    **Workers.** ``num_workers=0`` fills in this process (``WindowCache.fill``). With workers, loader workers read
    this rank's windows in index order, each taking contiguous runs of whole shards (batches of ``shard_size``
    windows, runs of at least ``RUN_WINDOWS``), so each decodes its recordings forward and publishes the shards it
    reads; decoder threads are shared out as for any loader. Then this process checks this rank's shards and
    fills any left over (a worker's write that failed). Other processes building the same shards at the same time
    are safe on local disks: shards are locked.
    """
    from tqdm.auto import tqdm

    num_workers = _integer("num_workers", num_workers, 0, MAX_WORKERS)
    rank, world_size = _integer("rank", rank, 0), _integer("world_size", world_size, 1)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
    cache = cached.window_cache
    shards = part_of(cache.n_shards, rank, world_size)
    part = _WindowRange(cached, *(min(k * cache.shard_size, len(cached)) for k in (shards.start, shards.stop)))
    before = _shards_complete(cache, shards)
    if num_workers > 0 and len(part):
        loader = WindowLoader(part, batch_size=cache.shard_size, shuffle=False, num_workers=num_workers,
                              collate_fn=_indices_only, rank=0, world_size=1)
        try:
            with tqdm(total=len(part), desc="cache", unit="window", disable=not progress) as bar:
                for batch in loader:
                    bar.update(len(batch["index"]))
        finally:
            loader.close()
    by_workers = _shards_complete(cache, shards) - before
    counts = cache.fill(progress=progress and num_workers == 0, shards=shards)
    counts["already_complete"] -= by_workers
    counts.update(filled_by_workers=by_workers, rank=rank, world_size=world_size, first_shard=shards.start,
                  stop_shard=shards.stop)
    if world_size > 1 and rank_world()[1] > 1:
        torch.distributed.barrier()  # every rank's shards are complete when any rank returns
    return counts
