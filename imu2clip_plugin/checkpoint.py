"""Training checkpoints: a file format without pickle, checked against a sha256 record, and checked field by field
before anything is restored.

- :func:`save_checkpoint` / :func:`load_checkpoint`: the file pair ``checkpoint.pt`` + ``checkpoint.pt.sha256.json``
  (the contract is in :func:`save_checkpoint`'s docstring).
- :func:`check_checkpoint`: the structure of a loaded training checkpoint (types, ranges, RNG states, finite values).
- :func:`restore`: a checked checkpoint put back into a run's model, optimiser, scheduler, scaler, loader and
  RNGs, checking what needs them (shapes, groups, the loader's window set and position).

Every problem is a :class:`~imu2clip_plugin.errors.CheckpointError` naming the file (and the field).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import numbers
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .distributed import atomic_write, fsync_dir, set_rng_state, write_durable
from .errors import CheckpointError

CHECKPOINT_NAME = "checkpoint.pt"
CHECKSUM_SUFFIX = ".sha256.json"     # checkpoint.pt.sha256.json: the checkpoint's size and sha256
PARTIAL_SUFFIX = ".partial"          # checkpoint.pt.partial: a checkpoint being written
CHECKPOINT_FORMAT_VERSION = 2
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")   # terminal colour/bold codes in torch's messages


def checksum_path(path: str | os.PathLike) -> Path:
    """The checksum record of a checkpoint: ``checkpoint.pt`` → ``checkpoint.pt.sha256.json``."""
    p = Path(path)
    return p.with_name(p.name + CHECKSUM_SUFFIX)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` with its checksum record ``path.sha256.json``; returns ``path``.

    Contract (what :func:`load_checkpoint` accepts):

    - ``path`` is a ``torch.save`` file of a dict holding only tensors and plain values (dict, list, tuple, str, int,
      float, bool, None), so it loads with ``torch.load(weights_only=True)`` and no pickled code ever runs. The
      trainer stores RNG states in that form (numpy's key as an int64 tensor, Python's state as a list of ints).
    - ``path.sha256.json`` is ``{"file", "size", "sha256", "step", "format_version"}`` for exactly those bytes.
    - Writes, in order: the data to ``path.partial`` (fsync), the record (to a temporary name, fsync, rename), then
      ``path.partial`` renamed onto ``path``. A crash before the record leaves the previous pair intact; a crash
      between the record and the last rename leaves a record naming ``path.partial``'s bytes, which
      :func:`load_checkpoint` completes (renames) on the next load. A record and data that disagree are never
      accepted.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    write_durable(partial, data)
    record = {"file": path.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
              "step": state.get("step"), "format_version": CHECKPOINT_FORMAT_VERSION}
    atomic_write(checksum_path(path), (json.dumps(record, indent=2) + "\n").encode())
    os.replace(partial, path)
    fsync_dir(path.parent)
    return path


def _read_record(path: Path) -> dict[str, Any]:
    rec_path = checksum_path(path)
    try:
        rec = json.loads(rec_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checksum record {rec_path.name} beside it; refusing an unverified "
                              "checkpoint (checkpoints written before checksums were added cannot be resumed)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{rec_path}: unreadable checksum record of {path}: {e}") from None
    if (not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str) or not isinstance(rec.get("size"), int)
            or rec.get("file") != path.name):
        raise CheckpointError(f"{rec_path}: not a checksum record of {path.name}: {rec!r}")
    return rec


def _verified_bytes(path: Path, rec: dict[str, Any]) -> bytes:
    """The checkpoint's bytes, checked against the record; rolls an interrupted save forward."""
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    found: list[str] = []
    # path, then a save's partial file, then path again (another rank may have rolled it forward meanwhile)
    for cand in (path, partial, path):
        try:
            data = cand.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise CheckpointError(f"{cand}: cannot read the checkpoint: {e}") from None
        if len(data) == rec["size"] and hashlib.sha256(data).hexdigest() == rec["sha256"]:
            if cand is partial:  # the save was interrupted after committing its record: complete it
                try:
                    os.replace(partial, path)
                except OSError:
                    pass
            return data
        if cand is path and not found:
            found.append(f"{len(data)} bytes" if len(data) != rec["size"] else "a different sha256")
    if not found:
        raise CheckpointError(f"{path}: checkpoint file not found (its checksum record {checksum_path(path).name} "
                              "exists)")
    what = "truncated or extended" if found[0].endswith("bytes") else "corrupt"
    raise CheckpointError(f"{path}: checkpoint is {what}: {found[0]}, its record {checksum_path(path).name} says "
                          f"{rec['size']} bytes, sha256 {rec['sha256'][:16]}...; refusing to resume from it")


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`: size and sha256 verified against ``path.sha256.json``,
    then ``torch.load(weights_only=True)`` (no pickled code runs; only tensors and plain values are accepted).

    Raises:
        CheckpointError: no record, a record that does not match the file (corrupt, truncated, replaced), or a file
            that is not a plain-values checkpoint. The message names the file.
    """
    path = Path(path)
    rec = _read_record(path)
    data = _verified_bytes(path, rec)
    try:
        ck = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for anything but tensors and plain values; RuntimeError when unreadable
        text = _ANSI_ESCAPE.sub("", str(e)).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        why = ("it holds more than tensors and plain values (loaded with weights_only=True, never unpickled)"
               if isinstance(e, pickle.UnpicklingError) else "it is not a readable torch.save file")
        raise CheckpointError(f"{path}: refusing to load the checkpoint: {why}: {first}") from None
    if not isinstance(ck, dict) or ck.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        got = ck.get("format_version") if isinstance(ck, dict) else type(ck).__name__
        raise CheckpointError(f"{path}: not an imu2clip checkpoint of format_version {CHECKPOINT_FORMAT_VERSION} "
                              f"(found {got!r})")
    return ck


# -- what a training checkpoint must hold ----------------------------------------------------------------
# The checksum proves only that the file is the one its record names: a hand-made file with a matching record
# passes it. So a checkpoint's contents are checked field by field before anything is restored, and every
# problem is a CheckpointError naming the file and the field (never a KeyError or a torch traceback).
_MT_WORDS = 624   # the Mersenne Twister state of numpy's legacy RNG and Python's random


def _bad(path: Path, field: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: field {field!r} {problem}; refusing to resume from this checkpoint")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _short(v: Any) -> str:
    r = repr(v) if not isinstance(v, torch.Tensor) else f"tensor {tuple(v.shape)} {v.dtype}"
    return r if len(r) <= 80 else r[:77] + "..."


def _get(path: Path, d: dict[str, Any], key: str, kind: str, where: str = "") -> Any:
    """``d[key]``, checked to be ``kind`` ("dict", "list", "int", "number", "tensor", "str")."""
    field = f"{where}{key}"
    if key not in d:
        raise _bad(path, field, "is missing")
    v = d[key]
    ok = {"dict": lambda x: isinstance(x, dict), "list": lambda x: isinstance(x, (list, tuple)),
          "int": _is_int, "number": _is_number, "tensor": lambda x: isinstance(x, torch.Tensor),
          "str": lambda x: isinstance(x, str)}[kind](v)
    if not ok:
        raise _bad(path, field, f"must be {'an' if kind == 'int' else 'a'} {kind}, got {type(v).__name__} {_short(v)}")
    return v


def _check_finite(path: Path, field: str, obj: Any) -> None:
    """Every floating tensor and float under ``obj`` is finite."""
    if isinstance(obj, torch.Tensor):
        if (obj.is_floating_point() or obj.is_complex()) and obj.numel() and not bool(torch.isfinite(obj).all()):
            n = int((~torch.isfinite(obj)).sum())
            raise _bad(path, field, f"holds {n} NaN or infinite value(s) (of {obj.numel()})")
    elif isinstance(obj, float):
        if not math.isfinite(obj):
            raise _bad(path, field, f"is {obj!r}, not a finite number")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(path, f"{field}.{k}", v)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_finite(path, f"{field}[{i}]", v)


def _check_rng(path: Path, st: Any, field: str) -> None:
    if not isinstance(st, dict):
        raise _bad(path, field, f"must be a dict of RNG states, got {type(st).__name__}")
    t = _get(path, st, "torch", "tensor", f"{field}.")
    want = torch.get_rng_state().numel()
    if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() != want:
        raise _bad(path, f"{field}.torch", f"must be a uint8 tensor of {want} bytes (torch's RNG state), got "
                                           f"{_short(t)}")
    n = _get(path, st, "numpy", "dict", f"{field}.")
    if n.get("name") != "MT19937":
        raise _bad(path, f"{field}.numpy.name", f"must be 'MT19937', got {_short(n.get('name'))}")
    key = _get(path, n, "key", "tensor", f"{field}.numpy.")
    if key.dtype != torch.int64 or tuple(key.shape) != (_MT_WORDS,) or (
            bool((key < 0).any()) or bool((key >= 2 ** 32).any())):
        raise _bad(path, f"{field}.numpy.key", f"must be an int64 tensor of {_MT_WORDS} values in [0, 2**32), got "
                                               f"{_short(key)}")
    pos = _get(path, n, "pos", "int", f"{field}.numpy.")
    if not 0 <= pos <= _MT_WORDS:
        raise _bad(path, f"{field}.numpy.pos", f"must be in [0, {_MT_WORDS}], got {pos}")
    if _get(path, n, "has_gauss", "int", f"{field}.numpy.") not in (0, 1):
        raise _bad(path, f"{field}.numpy.has_gauss", f"must be 0 or 1, got {n['has_gauss']!r}")
    _get(path, n, "cached_gaussian", "number", f"{field}.numpy.")
    py = _get(path, st, "python", "dict", f"{field}.")
    if _get(path, py, "version", "int", f"{field}.python.") != random.getstate()[0]:
        raise _bad(path, f"{field}.python.version", f"must be {random.getstate()[0]}, got {py['version']!r}")
    words = _get(path, py, "state", "list", f"{field}.python.")
    if (len(words) != _MT_WORDS + 1 or not all(_is_int(w) and 0 <= w < 2 ** 32 for w in words[:-1])
            or not (_is_int(words[-1]) and 0 <= words[-1] <= _MT_WORDS)):
        raise _bad(path, f"{field}.python.state", f"must be {_MT_WORDS} integers in [0, 2**32) and a position in "
                                                  f"[0, {_MT_WORDS}], got {_short(words)}")
    if "gauss_next" not in py or not (py["gauss_next"] is None or _is_number(py["gauss_next"])):
        raise _bad(path, f"{field}.python.gauss_next", f"must be None or a number, got {_short(py.get('gauss_next'))}")
    if "cuda" in st:
        cuda = st["cuda"]
        if not (isinstance(cuda, (list, tuple))
                and all(isinstance(c, torch.Tensor) and c.dtype == torch.uint8 and c.dim() == 1 for c in cuda)):
            raise _bad(path, f"{field}.cuda", f"must be a list of uint8 tensors (CUDA RNG states), got {_short(cuda)}")
    _check_finite(path, field, st)


def check_checkpoint(ck: dict[str, Any], path: str | os.PathLike) -> None:
    """Check a loaded training checkpoint's structure: the fields :func:`train` restores, of the right types,
    ``step >= 0``, every RNG state of the right shape and dtype, finite floating tensors in the model and optimiser
    states. Raises :class:`CheckpointError` naming the file and the field. (What needs the run, such as the model's
    shapes or the loader's position, is checked when :func:`train` restores it.)"""
    path = Path(path)
    model = _get(path, ck, "model", "dict")
    for k, v in model.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise _bad(path, f"model.{k}", f"must map parameter names to tensors, got {type(v).__name__}")
    _check_finite(path, "model", model)
    opt = _get(path, ck, "optimizer", "dict")
    for k, v in _get(path, opt, "state", "dict", "optimizer.").items():
        if not isinstance(v, dict) or not all(isinstance(x, torch.Tensor) or _is_number(x) for x in v.values()):
            raise _bad(path, f"optimizer.state.{k}", f"must be a dict of tensors and numbers, got {_short(v)}")
    groups = _get(path, opt, "param_groups", "list", "optimizer.")
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or not isinstance(g.get("params"), (list, tuple)):
            raise _bad(path, f"optimizer.param_groups[{i}]", "must be a dict with a 'params' list")
    _check_finite(path, "optimizer", opt)
    sched = _get(path, ck, "scheduler", "dict")
    _get(path, sched, "last_epoch", "int", "scheduler.")
    _check_finite(path, "scheduler", sched)
    _check_finite(path, "scaler", _get(path, ck, "scaler", "dict"))
    step = _get(path, ck, "step", "int")
    if step < 0:
        raise _bad(path, "step", f"must be >= 0, got {step}")
    epoch = _get(path, ck, "epoch", "int")
    if not 0 <= epoch <= step:
        raise _bad(path, "epoch", f"must be in [0, step={step}], got {epoch}")
    hist = _get(path, ck, "val_history", "list")
    if not all(_is_number(v) for v in hist):   # NaN is allowed: a validation with no batch of 2
        raise _bad(path, "val_history", f"must be a list of numbers, got {_short(hist)}")
    last_val = _get(path, ck, "last_val_step", "int")
    if not -1 <= last_val <= step:
        raise _bad(path, "last_val_step", f"must be in [-1, step={step}], got {last_val}")
    for key, check in (("loader", None), ("rng", _check_rng)):
        v = ck.get(key)
        if key not in ck:
            raise _bad(path, key, "is missing")
        items = list(v) if isinstance(v, (list, tuple)) else [v]
        if isinstance(v, (list, tuple)) and not v:
            raise _bad(path, key, "is an empty list (one entry per rank expected)")
        for i, item in enumerate(items):
            field = f"{key}[{i}]" if isinstance(v, (list, tuple)) else key
            if not isinstance(item, dict):
                raise _bad(path, field, f"must be a dict, got {type(item).__name__} {_short(item)}")
            if check is not None:
                check(path, item, field)
            else:
                for sub in ("epoch", "offset"):
                    val = _get(path, item, sub, "int", f"{field}.")
                    if val < 0:
                        raise _bad(path, f"{field}.{sub}", f"must be >= 0, got {val}")


def _like(path: Path, field: str, saved: Any, fresh: Any) -> None:
    """``saved`` has the plain-value shape of ``fresh`` (this run's own state): numbers where it has numbers
    (finite), flags where it has flags, lists of the same length; keys of dicts only among its keys."""
    if isinstance(fresh, bool) or fresh is None:
        ok = isinstance(saved, bool) or saved is None
    elif _is_number(fresh):
        ok = _is_number(saved) and math.isfinite(saved)
    elif isinstance(fresh, str):
        ok = isinstance(saved, str)
    elif isinstance(fresh, (list, tuple)):
        ok = isinstance(saved, (list, tuple)) and len(saved) == len(fresh)
        if ok:
            for i, (a, b) in enumerate(zip(saved, fresh)):
                _like(path, f"{field}[{i}]", a, b)
    elif isinstance(fresh, dict):
        ok = isinstance(saved, dict)
        if ok:
            extra = sorted(map(str, set(saved) - set(fresh)))
            if extra:
                raise _bad(path, field, f"has unknown key(s) {extra}")
            for k in saved:
                _like(path, f"{field}.{k}", saved[k], fresh[k])
    elif isinstance(fresh, torch.Tensor):
        ok = isinstance(saved, torch.Tensor)
    else:  # pragma: no cover - no other kinds in these states
        ok = type(saved) is type(fresh)
    if not ok:
        raise _bad(path, field, f"must be like {_short(fresh)}, got {_short(saved)}")


def restore_checkpoint(ck: dict[str, Any], path: Path, *, model: nn.Module, opt, sched, scaler, loader, rank: int,
                       world: int, total: int) -> tuple[int, list[float], int]:
    """Restore a checked checkpoint (:func:`check_checkpoint`) into this run's objects, checking what needs them;
    returns ``(step, val_history, last_val_step)``. Raises :class:`CheckpointError` naming the file and the field."""
    step = int(ck["step"])
    if step > total:
        raise _bad(path, "step", f"is {step}, past this run's {total} steps (max_steps, or epochs x batches per "
                                 "epoch): resume with at least as many steps, or start over with overwrite")
    _restore_model(ck, path, model)
    _restore_optimizer(ck, path, opt)
    _restore_schedule(ck, path, step, sched, scaler)
    _restore_loader(ck, path, step, loader, rank, world)
    _restore_rng(ck, path, rank, world)
    return step, [float(v) for v in ck["val_history"]], int(ck["last_val_step"])


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0]


def _restore_model(ck: dict[str, Any], path: Path, model: nn.Module) -> None:
    """The model: same parameter names and shapes (a strict load, summarised instead of torch's long message)."""
    fresh = model.state_dict()
    saved = ck["model"]
    problems = [f"missing {k}" for k in fresh if k not in saved]
    problems += [f"unexpected {k}" for k in saved if k not in fresh]
    problems += [f"{k} has shape {tuple(saved[k].shape)}, this model {tuple(v.shape)}" for k, v in fresh.items()
                 if k in saved and saved[k].shape != v.shape]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise _bad(path, "model", f"does not fit this run's model ({len(problems)} problem(s): "
                                  f"{'; '.join(problems[:3])}{more}): was it saved with another encoder config?")
    try:
        model.load_state_dict(saved, strict=True)
    except (RuntimeError, ValueError, TypeError) as e:
        raise _bad(path, "model", f"does not load: {_first_line(e)}") from None


def _restore_optimizer(ck: dict[str, Any], path: Path, opt) -> None:
    """The optimiser: torch checks the groups' sizes; the hyperparameters and per-parameter states are checked
    here."""
    groups = ck["optimizer"]["param_groups"]
    if len(groups) != len(opt.param_groups):
        raise _bad(path, "optimizer.param_groups", f"has {len(groups)} group(s), this run's optimiser "
                                                   f"{len(opt.param_groups)}")
    for i, (g, mine) in enumerate(zip(groups, opt.state_dict()["param_groups"])):
        for k in set(g) & set(mine) - {"params"}:
            _like(path, f"optimizer.param_groups[{i}].{k}", g[k], mine[k])
    try:
        opt.load_state_dict(ck["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        raise _bad(path, "optimizer", f"does not fit this run's optimiser: {_first_line(e)}") from None
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                    raise _bad(path, f"optimizer.state.{k}", f"of group {gi} parameter {pi} has shape "
                                                            f"{tuple(v.shape)}, the parameter {tuple(p.shape)}")


def _restore_schedule(ck: dict[str, Any], path: Path, step: int, sched, scaler) -> None:
    """The scheduler and the loss scaler: only their own keys, of their own kinds."""
    if ck["scheduler"]["last_epoch"] != step:
        raise _bad(path, "scheduler.last_epoch", f"is {ck['scheduler']['last_epoch']}, not the checkpoint's step "
                                                 f"{step} (the schedule steps once per training step)")
    mine = sched.state_dict()
    _like(path, "scheduler", ck["scheduler"], mine)
    if any(fn is not None for fn in ck["scheduler"].get("lr_lambdas", [])):
        raise _bad(path, "scheduler.lr_lambdas", f"must be a list of None, got {_short(ck['scheduler']['lr_lambdas'])}")
    sched.load_state_dict(dict(ck["scheduler"]))
    if scaler.is_enabled() and ck["scaler"]:   # a run saved without a loss scaler (CPU, bfloat16) keeps the default
        mine = scaler.state_dict()
        _like(path, "scaler", ck["scaler"], mine)
        missing = sorted(set(mine) - set(ck["scaler"]))
        if missing:
            raise _bad(path, "scaler", f"lacks {missing}")
        if not ck["scaler"]["scale"] > 0:
            raise _bad(path, "scaler.scale", f"must be > 0, got {ck['scaler']['scale']!r}")
        scaler.load_state_dict(ck["scaler"])


def _restore_loader(ck: dict[str, Any], path: Path, step: int, loader, rank: int, world: int) -> None:
    """The loader: its own checks (window set, seed, sharding), then the position within the epoch."""
    lst = ck["loader"]
    if isinstance(lst, (list, tuple)) and len(lst) != world:
        raise _bad(path, "loader", f"holds the states of {len(lst)} rank(s), this run has {world}")
    field = f"loader[{rank}]" if isinstance(lst, (list, tuple)) else "loader"
    state = lst[rank] if isinstance(lst, (list, tuple)) else lst
    try:
        loader.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as e:
        msg = f"lacks {e.args[0]!r}" if isinstance(e, KeyError) and e.args else str(e)
        raise _bad(path, field, f"does not fit this run's loader: {msg}") from None
    n = len(loader.order(loader.epoch))
    if loader.offset > n:
        raise _bad(path, f"{field}.offset", f"is {loader.offset}, past the {n} windows of epoch {loader.epoch}")
    if loader.epoch > step:
        raise _bad(path, f"{field}.epoch", f"is {loader.epoch}, more epochs than the checkpoint's {step} steps")


def _restore_rng(ck: dict[str, Any], path: Path, rank: int, world: int) -> None:
    """This rank's RNG states (one per rank in a checkpoint of a distributed run)."""
    rngs = ck["rng"]
    if isinstance(rngs, (list, tuple)) and len(rngs) != world:
        raise _bad(path, "rng", f"holds the states of {len(rngs)} rank(s), this run has {world}")
    try:
        set_rng_state(rngs[rank] if isinstance(rngs, (list, tuple)) else rngs)
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise _bad(path, "rng", f"cannot be restored: {_first_line(e)}") from None


def checkpoint_files(run_dir: Path) -> list[Path]:
    """The checkpoint files in ``run_dir`` (data, checksum record, an interrupted save's partial file)."""
    path = run_dir / CHECKPOINT_NAME
    return [p for p in (checksum_path(path), path, path.with_name(path.name + PARTIAL_SUFFIX)) if p.exists()]


def recorded_step(run_dir: Path) -> str:
    """The step the checksum record in ``run_dir`` names, as text ("unknown" when it cannot be read)."""
    try:
        step = json.loads(checksum_path(run_dir / CHECKPOINT_NAME).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return str(step) if _is_int(step) else "unknown"

