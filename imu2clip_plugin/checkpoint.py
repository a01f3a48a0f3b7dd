"""Training checkpoints: a file format without pickle, checked against a sha256 record, and checked field by field
before anything is restored.

- :func:`save_checkpoint` / :func:`load_checkpoint`: the file pair ``checkpoint.pt`` + ``checkpoint.pt.sha256.json``
  (the contract is in :func:`save_checkpoint`'s docstring), in a local folder or at an fsspec URL (``s3://...``).
- :func:`check_checkpoint`: the structure of a loaded training checkpoint (types, ranges, RNG states, finite values).
- :func:`restore_checkpoint`: a checked checkpoint put back into a run's model, optimiser, scheduler, scaler, loader
  and RNGs, checking what needs them (shapes, groups, the loader's window set and position); :func:`restore_best`:
  the best-so-far state (the validation metric, its epoch and step, the encoder's weights).

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
from .rundir import exists_url, is_url, move_url, read_url, remove_url, write_url

CHECKPOINT_NAME = "checkpoint.pt"
CHECKSUM_SUFFIX = ".sha256.json"     # checkpoint.pt.sha256.json: the checkpoint's size and sha256
PARTIAL_SUFFIX = ".partial"          # checkpoint.pt.partial: a checkpoint being written
CHECKPOINT_FORMAT_VERSION = 2
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")   # terminal colour/bold codes in torch's messages


SELECT_METRICS = ("imu_video_r1", "imu_text_r1", "val_loss")   # what a best checkpoint may be selected by


def checksum_path(path: str | os.PathLike) -> Path | str:
    """The checksum record of a checkpoint: ``checkpoint.pt`` → ``checkpoint.pt.sha256.json`` (a URL for a URL)."""
    if is_url(path):
        return os.fspath(path) + CHECKSUM_SUFFIX
    p = Path(path)
    return p.with_name(p.name + CHECKSUM_SUFFIX)


def _partial_path(path: Path | str) -> Path | str:
    return path + PARTIAL_SUFFIX if isinstance(path, str) else path.with_name(path.name + PARTIAL_SUFFIX)


def _basename(path: Path | str) -> str:
    return os.path.basename(path) if isinstance(path, str) else path.name


def _as_path(path: str | os.PathLike) -> Path | str:
    """A local checkpoint path as a ``Path``, a URL as its string."""
    return os.fspath(path) if is_url(path) else Path(path)


class _Files:
    """Reading and moving the files of one checkpoint: local paths, or URLs through fsspec."""

    def __init__(self, path: Path | str, storage_options: dict[str, Any] | None):
        self.remote, self.so = isinstance(path, str), storage_options

    def read(self, p: Path | str) -> bytes:
        return read_url(p, self.so) if self.remote else p.read_bytes()

    def move(self, src: Path | str, dst: Path | str) -> None:
        if self.remote:
            move_url(src, dst, self.so)
        else:
            os.replace(src, dst)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike,
                    storage_options: dict[str, Any] | None = None) -> Path | str:
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
    - At a URL (``s3://...``; ``storage_options`` configure its filesystem) the same three steps, each one whole
      object written in one put (replaced whole, never seen half-written) and the last a server-side move, so the
      same crash cases hold.
    """
    path = _as_path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    partial = _partial_path(path)
    record = {"file": _basename(path), "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
              "step": state.get("step"), "format_version": CHECKPOINT_FORMAT_VERSION}
    if isinstance(path, str):
        write_url(partial, data, storage_options)
        write_url(checksum_path(path), (json.dumps(record, indent=2) + "\n").encode(), storage_options)
        move_url(partial, path, storage_options)
        return path
    write_durable(partial, data)
    atomic_write(checksum_path(path), (json.dumps(record, indent=2) + "\n").encode())
    os.replace(partial, path)
    fsync_dir(path.parent)
    return path


def _read_record(path: Path | str, files: _Files) -> dict[str, Any]:
    rec_path = checksum_path(path)
    try:
        rec = json.loads(files.read(rec_path).decode())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checksum record {_basename(rec_path)} beside it; refusing an unverified "
                              "checkpoint (checkpoints written before checksums were added cannot be resumed)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{rec_path}: unreadable checksum record of {path}: {e}") from None
    if (not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str) or not isinstance(rec.get("size"), int)
            or rec.get("file") != _basename(path)):
        raise CheckpointError(f"{rec_path}: not a checksum record of {_basename(path)}: {rec!r}")
    return rec


def _verified_bytes(path: Path | str, rec: dict[str, Any], files: _Files) -> bytes:
    """The checkpoint's bytes, checked against the record; rolls an interrupted save forward."""
    partial = _partial_path(path)
    found: list[str] = []
    # path, then a save's partial file, then path again (another rank may have rolled it forward meanwhile)
    for cand in (path, partial, path):
        try:
            data = files.read(cand)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise CheckpointError(f"{cand}: cannot read the checkpoint: {e}") from None
        if len(data) == rec["size"] and hashlib.sha256(data).hexdigest() == rec["sha256"]:
            if cand is partial:  # the save was interrupted after committing its record: complete it
                try:
                    files.move(partial, path)
                except OSError:
                    pass
            return data
        if cand is path and not found:
            found.append(f"{len(data)} bytes" if len(data) != rec["size"] else "a different sha256")
    rec_name = _basename(checksum_path(path))
    if not found:
        raise CheckpointError(f"{path}: checkpoint file not found (its checksum record {rec_name} exists)")
    what = "truncated or extended" if found[0].endswith("bytes") else "corrupt"
    raise CheckpointError(f"{path}: checkpoint is {what}: {found[0]}, its record {rec_name} says "
                          f"{rec['size']} bytes, sha256 {rec['sha256'][:16]}...; refusing to resume from it")


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu",
                    storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (a local path, or a URL with its ``storage_options``):
    size and sha256 verified against ``path.sha256.json``, then ``torch.load(weights_only=True)`` (no pickled code
    runs; only tensors and plain values are accepted).

    Raises:
        CheckpointError: no record, a record that does not match the file (corrupt, truncated, replaced), or a file
            that is not a plain-values checkpoint. The message names the file.
    """
    path = _as_path(path)
    files = _Files(path, storage_options)
    rec = _read_record(path, files)
    data = _verified_bytes(path, rec, files)
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
    path = _as_path(path)
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
    _check_best(path, ck, step)


def _check_best(path: Path, ck: dict[str, Any], step: int) -> None:
    """The optional best-so-far fields: ``best`` (None, or the metric, its value, epoch and step, and the encoder's
    weights then), ``bad_epochs`` (validations since, without improvement) and ``early_stopped`` (patience ran out).
    A checkpoint without them (written before best-checkpoint selection) resumes with no best yet."""
    best = ck.get("best")
    if best is not None:
        if not isinstance(best, dict):
            raise _bad(path, "best", f"must be None or a dict, got {type(best).__name__} {_short(best)}")
        metric = _get(path, best, "metric", "str", "best.")
        if metric not in SELECT_METRICS:
            raise _bad(path, "best.metric", f"must be one of {list(SELECT_METRICS)}, got {metric!r}")
        value = _get(path, best, "value", "number", "best.")
        if not math.isfinite(value):
            raise _bad(path, "best.value", f"is {value!r}, not a finite number")
        if _get(path, best, "epoch", "int", "best.") < 0:
            raise _bad(path, "best.epoch", f"must be >= 0, got {best['epoch']}")
        if not 0 <= _get(path, best, "step", "int", "best.") <= step:
            raise _bad(path, "best.step", f"must be in [0, step={step}], got {best['step']}")
        enc = _get(path, best, "encoder", "dict", "best.")
        for k, v in enc.items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):
                raise _bad(path, f"best.encoder.{k}", f"must map parameter names to tensors, got {type(v).__name__}")
        _check_finite(path, "best.encoder", enc)
    if "bad_epochs" in ck and not (_is_int(ck["bad_epochs"]) and ck["bad_epochs"] >= 0):
        raise _bad(path, "bad_epochs", f"must be an int >= 0, got {_short(ck['bad_epochs'])}")
    if "early_stopped" in ck and not isinstance(ck["early_stopped"], bool):
        raise _bad(path, "early_stopped", f"must be true or false, got {_short(ck['early_stopped'])}")


def restore_best(ck: dict[str, Any], path: Path | str, encoder: nn.Module, metric: str
                 ) -> tuple[dict[str, Any] | None, int, bool]:
    """The best-so-far state of a checked checkpoint, for a run selecting by ``metric`` whose encoder is
    ``encoder``: ``(best, bad_epochs, early_stopped)``. Raises :class:`CheckpointError` when the checkpoint chose
    its best by another metric, or its best weights do not fit ``encoder``."""
    best = ck.get("best")
    if best is not None:
        if best["metric"] != metric:
            raise _bad(path, "best.metric", f"is {best['metric']!r}, this run selects by {metric!r}: resume with the "
                                            "same select_metric, or start over with overwrite")
        fresh = encoder.state_dict()
        saved = best["encoder"]
        problems = sorted(set(fresh) ^ set(saved)) or [k for k in fresh if saved[k].shape != fresh[k].shape]
        if problems:
            raise _bad(path, "best.encoder", f"does not fit this run's encoder ({len(problems)} problem(s), e.g. "
                                             f"{problems[0]!r})")
        best = {"metric": best["metric"], "value": float(best["value"]), "epoch": int(best["epoch"]),
                "step": int(best["step"]), "encoder": {k: v.detach().cpu().clone() for k, v in saved.items()}}
    return best, int(ck.get("bad_epochs", 0)), bool(ck.get("early_stopped", False))


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


def _in_run(run_dir: str | os.PathLike, name: str) -> Path | str:
    return os.fspath(run_dir).rstrip("/") + "/" + name if is_url(run_dir) else Path(run_dir) / name


def checkpoint_files(run_dir: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> list[Path | str]:
    """The checkpoint files in ``run_dir`` (data, checksum record, an interrupted save's partial file), in the order
    to remove them (the record first: nothing half-valid is left)."""
    path = _in_run(run_dir, CHECKPOINT_NAME)
    cands = (checksum_path(path), path, _partial_path(path))
    if isinstance(path, str):
        return [p for p in cands if exists_url(p, storage_options)]
    return [p for p in cands if p.exists()]


def remove_checkpoint(run_dir: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
    """Remove the checkpoint files of ``run_dir`` (its record first)."""
    for f in checkpoint_files(run_dir, storage_options):
        if isinstance(f, str):
            remove_url(f, storage_options)
        else:
            f.unlink()


def recorded_step(run_dir: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> str:
    """The step the checksum record in ``run_dir`` names, as text ("unknown" when it cannot be read)."""
    rec = checksum_path(_in_run(run_dir, CHECKPOINT_NAME))
    try:
        raw = read_url(rec, storage_options) if isinstance(rec, str) else rec.read_bytes()
        step = json.loads(raw).get("step")
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return str(step) if _is_int(step) else "unknown"

