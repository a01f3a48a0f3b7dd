"""Training the IMU encoder against frozen CLIP towers (plain PyTorch; ``torch.distributed`` under ``torchrun``).

``train(TrainConfig(...)) -> dict`` builds the windows (split by recording), optionally the embedding cache
(:mod:`imu2clip_plugin.embed`), the encoder and the contrastive loss, and runs AdamW with linear warmup + cosine
decay, gradient clipping, AMP on CUDA, validation each epoch, JSONL metrics, a checkpoint each epoch and at the end
(exact resume with ``resume=True``, or ``resume="auto"``), and exports the encoder with ``save_encoder`` at the end.

Checkpoints are loaded without pickle and checked against a sha256 record: see :func:`save_checkpoint` and
:func:`load_checkpoint` for the contract.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import numbers
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .encoder import IMUEncoder, IMUEncoderConfig, save_encoder
from .loss import ContrastiveLoss

CHECKPOINT_NAME = "checkpoint.pt"
CHECKSUM_SUFFIX = ".sha256.json"     # checkpoint.pt.sha256.json: the checkpoint's size and sha256
PARTIAL_SUFFIX = ".partial"          # checkpoint.pt.partial: a checkpoint being written
CHECKPOINT_FORMAT_VERSION = 2
METRICS_NAME = "metrics.jsonl"
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")   # terminal colour/bold codes in torch's messages


class TrainSetupError(ValueError):
    """A run that cannot start as configured: a bad config value, too few windows for one batch, no recordings to
    hold out for validation, a checkpoint that cannot be used. An expected error: ``imu2clip train`` prints its
    message on one line (exit status 1) instead of a traceback."""


class CheckpointError(TrainSetupError):
    """A checkpoint that cannot be used: none to resume from, missing its checksum record, corrupt, truncated,
    replaced, holding anything but tensors and plain values (it is never unpickled), or holding values that do not
    fit the run (a missing or mistyped field, a negative step, NaN weights, a model of another shape...). The message
    names the file (and the field)."""


class RunDirInUseError(CheckpointError, FileExistsError):
    """A run without ``resume`` or ``overwrite`` into a run directory that already holds a checkpoint: refused, so
    an earlier run's checkpoint and metrics are never silently replaced. The message names the run directory."""


@dataclass
class TrainConfig:
    """Everything a run depends on (JSON round-trip with ``to_dict`` / ``from_dict``)."""

    # data
    store: str = "sample:ego4d"          # a store URL, or "sample:ego4d"
    sec: float = 5.0
    stride: float | None = 1.0
    anchor: str = "tile"
    imu_hz: float = 200.0
    frames: int = 1
    size: tuple[int, int] | None = (64, 64)
    train_split: str = "train"
    val_split: str = "val"
    val_fraction: float = 0.2          # held-out share of the train recordings when there is no val split
    # model
    targets: tuple[str, ...] = ("video",)
    target_weights: dict[str, float] = field(default_factory=dict)  # weight of each target's loss term (default 1)
    encoder: dict[str, Any] = field(default_factory=dict)   # IMUEncoderConfig fields; embed_dim follows the towers
    model_name: str = "imu2clip-tiny"
    pretrained: str | None = None
    checkpoint: str | None = None
    reduce: str = "center"
    # optimisation
    batch_size: int = 32
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    seed: int = 0
    num_workers: int = 0
    amp: bool = True                   # only ever used on CUDA
    amp_dtype: str = "auto"            # "bfloat16", "float16", or "auto": bfloat16 where the GPU supports it
    device: str = "auto"
    # run
    run_dir: str = "runs/imu2clip"
    use_cache: bool = True
    cache_url: str = "auto"
    resume: bool | str = False         # True: continue run_dir's checkpoint (error if none); "auto": if there is one
    overwrite: bool = False            # start over in a run_dir that holds a checkpoint, replacing it and the metrics
    stop_after_steps: int | None = None  # checkpoint and return after this many steps (interruption)
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        if self.size is not None:
            self.size = (int(self.size[0]), int(self.size[1]))
        if self.epochs < 1 and self.max_steps is None:
            raise TrainSetupError("give epochs >= 1 or max_steps")
        if not (isinstance(self.resume, bool) or self.resume == "auto"):
            raise TrainSetupError(f"resume must be true, false or 'auto', got {self.resume!r}")
        if self.amp_dtype not in ("auto", "bfloat16", "float16"):
            raise TrainSetupError(f"amp_dtype must be 'auto', 'bfloat16' or 'float16', got {self.amp_dtype!r}")
        if not isinstance(self.overwrite, bool):
            raise TrainSetupError(f"overwrite must be true or false, got {self.overwrite!r}")
        if self.overwrite and self.resume:
            raise TrainSetupError(f"overwrite=True starts the run over and resume={self.resume!r} continues it: "
                                  "give one of them")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        d["size"] = list(self.size) if self.size is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise TrainSetupError(f"unknown TrainConfig keys {unknown}")
        return cls(**d)


# -- helpers ----------------------------------------------------------------------------------------
class _Model(nn.Module):
    """Encoder + loss in one module, so DDP averages the temperature's gradient too."""

    def __init__(self, encoder: IMUEncoder, loss: ContrastiveLoss):
        super().__init__()
        self.encoder = encoder
        self.loss = loss

    def forward(self, imu, mask, video=None, text=None):
        z = self.encoder(imu, mask, normalize=True)
        return self.loss(z.float(), video=video, text=text)


def _dist_setup(device_pref: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu" if device_pref == "auto" else device_pref)
    return rank, world, device


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warmup over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        p = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * p))
    return f


def _open_windows(cfg: TrainConfig):
    import mmloader

    ds = mmloader.open(cfg.store)
    mods = ["imu"]
    if "video" in cfg.targets:
        mods.append("video")
    if "text" in cfg.targets:
        mods.append("text")
    kw: dict[str, Any] = {}
    if "video" in cfg.targets:
        kw.update(frames=cfg.frames, size=cfg.size)
    return ds.windows(sec=cfg.sec, stride=cfg.stride, modalities=mods, anchor=cfg.anchor, imu_hz=cfg.imu_hz, **kw)


@contextlib.contextmanager
def _setup_checks():
    """Turns the argument and data checks of opening the store, cutting windows, splitting and building the
    loader (ValueError / TypeError naming the argument) into :class:`TrainSetupError`: a run that cannot start."""
    try:
        yield
    except TrainSetupError:
        raise
    except (ValueError, TypeError) as e:
        raise TrainSetupError(str(e)) from e


def split_train_val(windows, cfg: TrainConfig):
    """``(train, val)``: the ``train_split`` and ``val_split`` windows, or, without a val split, a held-out
    ``val_fraction`` of the train recordings (chosen with ``seed``; always per recording)."""
    train = windows.split(cfg.train_split)
    # windows.split refuses a split the store lacks: look for the val split among the windows' own splits first
    if cfg.val_split in set(windows.index["split"].to_pylist()):
        return train, windows.split(cfg.val_split)
    recs = sorted(set(train.index["recording_id"].to_pylist()))
    if len(recs) < 2:
        raise TrainSetupError(f"no {cfg.val_split!r} split and only {len(recs)} train recording(s): cannot hold "
                              "out recordings for validation")
    k = min(len(recs) - 1, max(1, round(cfg.val_fraction * len(recs))))
    held = set(np.random.default_rng(cfg.seed).choice(recs, size=k, replace=False).tolist())
    return train.recordings([r for r in recs if r not in held]), train.recordings(sorted(held))


def _amp_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for ``TrainConfig.amp_dtype`` on ``device``."""
    if name not in ("auto", "bfloat16", "float16"):
        raise TrainSetupError(f"amp_dtype must be 'auto', 'bfloat16' or 'float16', got {name!r}")
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 or device.type != "cuda" else torch.float16
    return getattr(torch, name)


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values (so the checkpoint loads with ``weights_only=True``)."""
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


def _set_rng_state(st: dict[str, Any]) -> None:
    # RNG states are CPU ByteTensors; a checkpoint loaded with map_location="cuda" would have moved them
    torch.set_rng_state(st["torch"].cpu())
    n = st["numpy"]
    np.random.set_state((n["name"], n["key"].cpu().numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached_gaussian"])))
    p = st["python"]
    random.setstate((int(p["version"]), tuple(int(w) for w in p["state"]), p["gauss_next"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in st["cuda"]])


def _fsync_dir(d: Path) -> None:
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


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    _write_durable(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
    _write_durable(partial, data)
    record = {"file": path.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
              "step": state.get("step"), "format_version": CHECKPOINT_FORMAT_VERSION}
    _atomic_write(checksum_path(path), (json.dumps(record, indent=2) + "\n").encode())
    os.replace(partial, path)
    _fsync_dir(path.parent)
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


def _restore(ck: dict[str, Any], path: Path, *, model: nn.Module, opt, sched, scaler, loader, rank: int, world: int,
             total: int) -> tuple[int, list[float], int]:
    """Restore a checked checkpoint (:func:`check_checkpoint`) into this run's objects, checking what needs them;
    returns ``(step, val_history, last_val_step)``. Raises :class:`CheckpointError` naming the file and the field."""
    step = int(ck["step"])
    if step > total:
        raise _bad(path, "step", f"is {step}, past this run's {total} steps (max_steps, or epochs x batches per "
                                 "epoch): resume with at least as many steps, or start over with overwrite")
    # the model: same parameter names and shapes (a strict load, summarised instead of torch's long message)
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
        raise _bad(path, "model", f"does not load: {str(e).strip().splitlines()[0]}") from None
    # the optimiser: torch checks the groups' sizes; the hyperparameters and per-parameter states are checked here
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
        raise _bad(path, "optimizer", f"does not fit this run's optimiser: {str(e).strip().splitlines()[0]}") from None
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                    raise _bad(path, f"optimizer.state.{k}", f"of group {gi} parameter {pi} has shape "
                                                            f"{tuple(v.shape)}, the parameter {tuple(p.shape)}")
    # the scheduler and the scaler: only their own keys, of their own kinds
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
    # the loader: its own checks (window set, seed, sharding), then the position within the epoch
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
    # the RNGs
    rngs = ck["rng"]
    if isinstance(rngs, (list, tuple)) and len(rngs) != world:
        raise _bad(path, "rng", f"holds the states of {len(rngs)} rank(s), this run has {world}")
    try:
        _set_rng_state(rngs[rank] if isinstance(rngs, (list, tuple)) else rngs)
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise _bad(path, "rng", f"cannot be restored: {str(e).strip().splitlines()[0]}") from None
    return step, [float(v) for v in ck["val_history"]], int(ck["last_val_step"])


def _checkpoint_files(run_dir: Path) -> list[Path]:
    """The checkpoint files in ``run_dir`` (data, checksum record, an interrupted save's partial file)."""
    path = run_dir / CHECKPOINT_NAME
    return [p for p in (checksum_path(path), path, path.with_name(path.name + PARTIAL_SUFFIX)) if p.exists()]


def _resume_from(cfg: TrainConfig, run_dir: Path) -> dict[str, Any] | None:
    """The checked checkpoint to continue from, or None to start fresh (``resume`` False, or "auto" with none
    there). A fresh start into a run dir holding a checkpoint needs ``overwrite``: :class:`RunDirInUseError`."""
    has_checkpoint = bool(_checkpoint_files(run_dir))
    if not cfg.resume:
        if has_checkpoint and not cfg.overwrite:
            raise RunDirInUseError(
                f"{run_dir}: this run directory already holds {CHECKPOINT_NAME} (step "
                f"{_recorded_step(run_dir)}); refusing to start over and replace it and {METRICS_NAME}: pass "
                "--resume to continue it, --resume auto to continue it if there is one, or --overwrite to start "
                "over (TrainConfig resume=True / resume='auto' / overwrite=True), or use another run_dir")
        return None
    if not has_checkpoint:
        if cfg.resume == "auto":
            return None
        raise CheckpointError(f"{run_dir}: nothing to resume: no {CHECKPOINT_NAME} in this run directory (train "
                              "without resume to start a run, or resume='auto' to continue only if there is one)")
    path = run_dir / CHECKPOINT_NAME
    ck = load_checkpoint(path, map_location="cpu")
    check_checkpoint(ck, path)
    return ck


def _recorded_step(run_dir: Path) -> str:
    try:
        step = json.loads(checksum_path(run_dir / CHECKPOINT_NAME).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return str(step) if _is_int(step) else "unknown"


def _rewrite_metrics(path: Path, step: int | None) -> None:
    """Keep the metrics of the steps up to ``step`` (None: none), atomically: a resumed run logs each step once.

    The interrupted run's ``end`` record and lines torn by a crash are dropped too."""
    if not path.exists():
        return
    keep = []
    if step is not None:
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            st = rec.get("step", 0) if isinstance(rec, dict) else None
            if isinstance(st, (int, float)) and st <= step and rec.get("event") != "end":
                keep.append(line + "\n")
    _atomic_write(path, "".join(keep).encode())


class _Targets:
    """Turns a batch into target embeddings: from the cache (``*_emb``) or the towers online."""

    def __init__(self, towers, targets: Sequence[str], reduce: str, device: torch.device):
        self.towers, self.targets, self.reduce, self.device = towers, tuple(targets), reduce, device

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {}
        if "video" in self.targets:
            if "video_emb" in batch:
                out["video"] = batch["video_emb"].to(self.device, non_blocking=True)
            else:
                out["video"] = self.towers.encode_frames(batch["video"].to(self.device), reduce=self.reduce)
        if "text" in self.targets:
            if "text_emb" in batch:
                out["text"] = batch["text_emb"].to(self.device, non_blocking=True)
            else:
                from .embed import text_of
                out["text"] = self.towers.encode_text([text_of(t) for t in batch["text"]])
        return out


# -- training ----------------------------------------------------------------------------------------
def train(cfg: TrainConfig, windows=None, towers=None) -> dict[str, Any]:
    """Train; returns ``{"step", "epoch", "train_loss", "val_loss", "val_history", "run_dir", "encoder_dir",
    "stopped_early"}``. ``windows`` / ``towers`` may be passed in (else built from ``cfg``).

    ``cfg.resume``: False starts afresh (a new ``metrics.jsonl``); True continues ``run_dir/checkpoint.pt`` and
    raises :class:`CheckpointError` if there is none; ``"auto"`` continues it if there is one, else starts afresh.
    Starting afresh in a run dir that already holds a checkpoint raises :class:`RunDirInUseError` unless
    ``cfg.overwrite`` (which deletes the old checkpoint and starts a new ``metrics.jsonl`` once the data, model
    and loader are built: a run that fails before that leaves the old run dir as it was).
    A checkpoint that fails its checksum, holds anything but tensors and plain values, or lacks a field, has one
    of the wrong type or out of range (:func:`check_checkpoint`) raises :class:`CheckpointError` before any towers
    or caches are built; one that does not fit the run (model shapes, optimiser groups, the loader's window set or
    position, ``step`` past the run's total) raises it once the model and loader exist. Nothing in ``run_dir`` is
    written before the checkpoint is accepted. On resume, ``metrics.jsonl`` keeps only the records up to the
    checkpoint's step, so every step is logged once.

    Raises:
        TrainSetupError: the run cannot start (a config value, too few windows for one batch, no recordings to
            hold out); :class:`CheckpointError` and :class:`RunDirInUseError` are kinds of it."""
    from tqdm.auto import tqdm

    rank, world, device = _dist_setup(cfg.device)
    run_dir = Path(cfg.run_dir)
    ck = _resume_from(cfg, run_dir)   # every rank reads and checks it; fails before anything is built or written

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if towers is None:
        from .towers import ClipTowers

        towers = ClipTowers(cfg.model_name, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint, device=device)
    else:
        towers = towers.to(device)

    with _setup_checks():
        if windows is None:
            windows = _open_windows(cfg)
        train_ws, val_ws = split_train_val(windows, cfg)
    if cfg.use_cache:
        from .embed import build_embedding_cache

        if rank == 0:
            train_ws = build_embedding_cache(train_ws, towers, url=_sub_url(cfg.cache_url, "train"), reduce=cfg.reduce)
            val_ws = build_embedding_cache(val_ws, towers, url=_sub_url(cfg.cache_url, "val"), reduce=cfg.reduce)
        _barrier(world)
        if rank != 0:
            train_ws = build_embedding_cache(train_ws, towers, url=_sub_url(cfg.cache_url, "train"),
                                             reduce=cfg.reduce, fill="lazy")
            val_ws = build_embedding_cache(val_ws, towers, url=_sub_url(cfg.cache_url, "val"),
                                           reduce=cfg.reduce, fill="lazy")

    torch.manual_seed(cfg.seed)
    enc_cfg = IMUEncoderConfig.from_dict({**cfg.encoder, "embed_dim": towers.embed_dim})
    model = _Model(IMUEncoder(enc_cfg), ContrastiveLoss(cfg.targets, weights=cfg.target_weights)).to(device)
    ddp = model
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)

    with _setup_checks():
        loader = train_ws.loader(batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed,
                                 num_workers=cfg.num_workers, drop_last=True, even_shards=world > 1,
                                 pin_memory=device.type == "cuda")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise TrainSetupError(f"{len(train_ws)} train windows on this rank is less than one batch of "
                              f"{cfg.batch_size}: lower batch_size, or give more data (a smaller stride, more "
                              "recordings)")
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, total))
    use_amp = bool(cfg.amp and device.type == "cuda")
    amp_dtype = _amp_dtype(cfg.amp_dtype, device)
    # the loss scaler only for float16 (bfloat16 has float32's range)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    targets = _Targets(towers, cfg.targets, cfg.reduce, device)

    step, history, last_val_step = 0, [], -1
    ckpt_path = run_dir / CHECKPOINT_NAME
    resumed = ck is not None
    if ck is not None:
        step, history, last_val_step = _restore(ck, ckpt_path, model=model, opt=opt, sched=sched, scaler=scaler,
                                                loader=loader, rank=rank, world=world, total=total)
        ck = None
    # only now, with the data, the model and any checkpoint accepted, is the run dir written to
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite:   # start over: the old checkpoint goes (its record first: nothing half-valid remains)
            for f in _checkpoint_files(run_dir):
                f.unlink()
        _rewrite_metrics(run_dir / METRICS_NAME, step if resumed else None)   # fresh: a new metrics.jsonl
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    _barrier(world)

    def log(rec: dict[str, Any]) -> None:
        if rank == 0:
            with open(run_dir / METRICS_NAME, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def checkpoint() -> None:
        states = [loader.state_dict()]
        rngs = [_rng_state()]
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, (states[0], rngs[0]))
            states, rngs = [g[0] for g in gathered], [g[1] for g in gathered]
        if rank == 0:
            save_checkpoint({"format_version": CHECKPOINT_FORMAT_VERSION, "model": model.state_dict(),
                             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                             "scaler": scaler.state_dict(), "logit_scale": float(model.loss.logit_scale.detach()),
                             "loader": states if world > 1 else states[0], "rng": rngs if world > 1 else rngs[0],
                             "step": step, "epoch": loader.epoch, "val_history": history,
                             "last_val_step": last_val_step, "config": cfg.to_dict()}, ckpt_path)
        _barrier(world)

    @torch.no_grad()
    def validate() -> float:
        model.eval()
        # a fixed shuffled order (same batches every time): batches mix recordings, as in training
        vl = val_ws.loader(batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, num_workers=0,
                           even_shards=world > 1)
        tot = torch.zeros(2, dtype=torch.float64, device=device)
        for b in vl:
            n = len(b["index"])
            if n < 2:
                continue
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                loss = model(b["imu"].to(device), b["imu_mask"].to(device), **targets(b))
            tot += torch.tensor([float(loss) * n, n], dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(tot)
        model.train()
        return float(tot[0] / tot[1]) if tot[1] > 0 else float("nan")

    if step == 0 and not history:
        v0 = validate()
        history.append(v0)
        log({"event": "val", "step": 0, "epoch": loader.epoch, "val_loss": v0})

    model.train()
    bar = tqdm(total=total, initial=step, disable=rank != 0 or not cfg.progress, desc="train", dynamic_ncols=True)
    last_loss, stopped, t_start = float("nan"), False, time.perf_counter()
    while step < total and not stopped:
        epoch_done = True
        for batch in loader:
            imu, mask = batch["imu"].to(device, non_blocking=True), batch["imu_mask"].to(device, non_blocking=True)
            tg = targets(batch)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                loss = ddp(imu, mask, **tg)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            gnorm = None
            if cfg.grad_clip:
                scaler.unscale_(opt)
                gnorm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            scaler.step(opt)
            scaler.update()
            sched.step()
            model.loss.clamp_()
            step += 1
            last_loss = float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}")
            log({"event": "train", "step": step, "epoch": loader.epoch, "loss": last_loss,
                 "lr": sched.get_last_lr()[0], "grad_norm": gnorm,
                 "logit_scale": float(model.loss.logit_scale.detach())})
            if cfg.stop_after_steps is not None and step >= cfg.stop_after_steps:
                stopped, epoch_done = True, False
                break
            if step >= total:
                epoch_done = loader.offset >= len(loader.order(loader.epoch))
                break
        if epoch_done and not stopped:
            if loader.offset != 0:  # broke out exactly at the end of the epoch: start the next one
                loader.set_epoch(loader.epoch + 1)
            v = validate()
            history.append(v)
            last_val_step = step
            log({"event": "val", "step": step, "epoch": loader.epoch - 1, "val_loss": v})
            checkpoint()
    bar.close()
    if not stopped and last_val_step != step:
        v = validate()
        history.append(v)
        last_val_step = step
        log({"event": "val", "step": step, "epoch": loader.epoch, "val_loss": v})
    checkpoint()
    enc_dir = None
    if not stopped and rank == 0:
        enc_dir = str(save_encoder(model.encoder, run_dir / "encoder"))
    log({"event": "end", "step": step, "stopped_early": stopped, "seconds": time.perf_counter() - t_start})
    return {"step": step, "epoch": loader.epoch, "train_loss": last_loss, "val_loss": history[-1] if history else None,
            "val_history": history, "run_dir": str(run_dir), "encoder_dir": enc_dir, "stopped_early": stopped,
            "model": model}


def _sub_url(url: str, part: str) -> str:
    return url if url == "auto" else url.rstrip("/") + "/" + part
