"""Training the IMU encoder against frozen CLIP towers (plain PyTorch; ``torch.distributed`` under ``torchrun``).

``train(TrainConfig(...)) -> dict`` builds the windows (split by recording), optionally the embedding cache
(:mod:`imu2clip_plugin.embed`), the encoder and the contrastive loss, and runs AdamW with linear warmup + cosine
decay, gradient clipping, AMP on CUDA, validation each epoch, JSONL metrics, a checkpoint each epoch and at the end
(exact resume with ``resume=True``, or ``resume="auto"``), and exports the encoder with ``save_encoder`` at the end.

Checkpoints are loaded without pickle and checked against a sha256 record: see :func:`save_checkpoint` and
:func:`load_checkpoint` for the contract.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import random
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: none to resume from, missing its checksum record, corrupt, truncated,
    replaced, or holding anything but tensors and plain values (it is never unpickled). The message names the file."""


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
    stop_after_steps: int | None = None  # checkpoint and return after this many steps (interruption)
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        if self.size is not None:
            self.size = (int(self.size[0]), int(self.size[1]))
        if self.epochs < 1 and self.max_steps is None:
            raise ValueError("give epochs >= 1 or max_steps")
        if not (isinstance(self.resume, bool) or self.resume == "auto"):
            raise ValueError(f"resume must be true, false or 'auto', got {self.resume!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        d["size"] = list(self.size) if self.size is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}")
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


def split_train_val(windows, cfg: TrainConfig):
    """``(train, val)``: the ``train_split`` and ``val_split`` windows, or, without a val split, a held-out
    ``val_fraction`` of the train recordings (chosen with ``seed``; always per recording)."""
    train = windows.split(cfg.train_split)
    # windows.split refuses a split the store lacks: look for the val split among the windows' own splits first
    if cfg.val_split in set(windows.index["split"].to_pylist()):
        return train, windows.split(cfg.val_split)
    recs = sorted(set(train.index["recording_id"].to_pylist()))
    if len(recs) < 2:
        raise ValueError(f"no {cfg.val_split!r} split and only {len(recs)} train recording(s): cannot hold out")
    k = min(len(recs) - 1, max(1, round(cfg.val_fraction * len(recs))))
    held = set(np.random.default_rng(cfg.seed).choice(recs, size=k, replace=False).tolist())
    return train.recordings([r for r in recs if r not in held]), train.recordings(sorted(held))


def _amp_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for ``TrainConfig.amp_dtype`` on ``device``."""
    if name not in ("auto", "bfloat16", "float16"):
        raise ValueError(f"amp_dtype must be 'auto', 'bfloat16' or 'float16', got {name!r}")
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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = ("it holds more than tensors and plain values (loaded with weights_only=True, never unpickled)"
               if isinstance(e, pickle.UnpicklingError) else "it is not a readable torch.save file")
        raise CheckpointError(f"{path}: refusing to load the checkpoint: {why}: {first}") from None
    if not isinstance(ck, dict) or ck.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        got = ck.get("format_version") if isinstance(ck, dict) else type(ck).__name__
        raise CheckpointError(f"{path}: not an imu2clip checkpoint of format_version {CHECKPOINT_FORMAT_VERSION} "
                              f"(found {got!r})")
    return ck


def _resume_from(resume: bool | str, run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint to continue from, or None to start fresh (``resume`` False, or "auto" with none there)."""
    if not resume:
        return None
    path = run_dir / CHECKPOINT_NAME
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    if not (path.exists() or checksum_path(path).exists() or partial.exists()):
        if resume == "auto":
            return None
        raise CheckpointError(f"{run_dir}: nothing to resume: no {CHECKPOINT_NAME} in this run directory (train "
                              "without resume to start a run, or resume='auto' to continue only if there is one)")
    return load_checkpoint(path, map_location="cpu")


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
    A checkpoint that fails its checksum or holds anything but tensors and plain values raises
    :class:`CheckpointError` (before any towers or caches are built). On resume, ``metrics.jsonl`` keeps only the
    records up to the checkpoint's step, so every step is logged once."""
    from tqdm.auto import tqdm

    rank, world, device = _dist_setup(cfg.device)
    run_dir = Path(cfg.run_dir)
    ck = _resume_from(cfg.resume, run_dir)   # every rank reads it; fails before anything is written
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _rewrite_metrics(run_dir / METRICS_NAME, int(ck["step"]) if ck is not None else None)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    _barrier(world)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if towers is None:
        from .towers import ClipTowers

        towers = ClipTowers(cfg.model_name, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint, device=device)
    else:
        towers = towers.to(device)

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

    loader = train_ws.loader(batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, num_workers=cfg.num_workers,
                             drop_last=True, even_shards=world > 1, pin_memory=device.type == "cuda")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_ws)} train windows on this rank is less than one batch of {cfg.batch_size}")
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, total))
    use_amp = bool(cfg.amp and device.type == "cuda")
    amp_dtype = _amp_dtype(cfg.amp_dtype, device)
    # the loss scaler only for float16 (bfloat16 has float32's range)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    targets = _Targets(towers, cfg.targets, cfg.reduce, device)

    step, history, last_val_step = 0, [], -1
    ckpt_path = run_dir / CHECKPOINT_NAME
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        loader.load_state_dict(ck["loader"][rank] if isinstance(ck["loader"], list) else ck["loader"])
        step, history = int(ck["step"]), list(ck.get("val_history", []))
        last_val_step = int(ck.get("last_val_step", -1))
        _set_rng_state(ck["rng"][rank] if isinstance(ck["rng"], list) else ck["rng"])
        ck = None

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
