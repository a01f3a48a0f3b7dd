"""Training the IMU encoder against frozen CLIP towers (plain PyTorch; ``torch.distributed`` under ``torchrun``).

``train(TrainConfig(...)) -> dict`` builds the windows (split by recording), optionally the embedding cache
(:mod:`imu2clip_plugin.embed`), the encoder and the contrastive loss, and runs AdamW with linear warmup + cosine
decay, gradient clipping, AMP on CUDA, validation each epoch (loss and IMU→target R@1), JSONL metrics, a checkpoint
each epoch and at the end (exact resume with ``resume=True``, or ``resume="auto"``), keeps the best encoder by a
validation metric (``select_metric``; optional early stopping), and exports that encoder with ``save_encoder`` and
the run's ``summary.json`` at the end. It is a thin wrapper over :class:`Trainer`, whose methods (setup / resume /
step / validate / checkpoint / fit) are the stages of a run.

Checkpoints are loaded without pickle and checked against a sha256 record: see :func:`save_checkpoint` and
:func:`load_checkpoint` (:mod:`imu2clip_plugin.checkpoint`, re-exported here) for the contract. Ranks, barriers,
RNG states and atomic writes are :mod:`imu2clip_plugin.distributed`; the run folder (a local path or an fsspec URL,
shared by every rank) is :mod:`imu2clip_plugin.rundir`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import (CHECKPOINT_FORMAT_VERSION, CHECKPOINT_NAME, CHECKSUM_SUFFIX, PARTIAL_SUFFIX, SELECT_METRICS,
                         check_checkpoint, checkpoint_files, checksum_path, load_checkpoint, recorded_step,
                         remove_checkpoint, restore_best, restore_checkpoint, save_checkpoint)
from .distributed import (all_gather_objects, all_reduce_sum, barrier, broadcast_object, gather_objects,
                          init_distributed, rng_state)
from .encoder import CONFIG_NAME, WEIGHTS_NAME, IMUEncoder, IMUEncoderConfig, save_encoder
from .errors import CheckpointError, RunDirInUseError, TrainSetupError
from .loss import ContrastiveLoss
from .rundir import MetricsLog, RunDir
from .text import text_of

__all__ = ["TrainConfig", "Trainer", "train", "split_train_val", "lr_lambda", "resolve_select_metric", "recall_at_1",
           "TrainSetupError", "CheckpointError", "RunDirInUseError", "save_checkpoint", "load_checkpoint",
           "check_checkpoint", "checksum_path", "CHECKPOINT_NAME", "CHECKSUM_SUFFIX", "PARTIAL_SUFFIX",
           "CHECKPOINT_FORMAT_VERSION", "METRICS_NAME", "SUMMARY_NAME", "SELECT_METRICS"]

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"


@dataclass
class TrainConfig:
    """Everything a run depends on (JSON round-trip with ``to_dict`` / ``from_dict``)."""

    # data
    store: str = "sample:ego4d"          # a store URL, or "sample:ego4d"
    store_options: dict[str, Any] = field(default_factory=dict)   # keyword arguments of mmloader.open(store, ...)
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
    # best checkpoint
    select_metric: str = "auto"        # imu_video_r1, imu_text_r1, val_loss; auto: R@1 of the first target
    early_stop_patience: int | None = None   # stop after this many epochs without improvement (None: never)
    # run
    run_dir: str = "runs/imu2clip"     # a local folder or an fsspec URL (s3://...): every rank must see it
    run_storage_options: dict[str, Any] = field(default_factory=dict)   # fsspec options of a URL run_dir
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
        for name in ("store_options", "run_storage_options"):
            if not isinstance(getattr(self, name), dict):
                raise TrainSetupError(f"{name} must be a dict (JSON object), got {getattr(self, name)!r}")
        resolve_select_metric(self)
        p = self.early_stop_patience
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise TrainSetupError(f"early_stop_patience must be None or an integer >= 1 (epochs), got {p!r}")

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



def resolve_select_metric(cfg: TrainConfig) -> tuple[str, str]:
    """``(metric, why)``: what the best checkpoint is selected by. ``select_metric="auto"``: the IMU→video R@1 when
    video is a target, else the IMU→text R@1, else (no retrieval target applies) the lowest validation loss. An
    explicit R@1 whose modality is not a target: :class:`TrainSetupError`."""
    m = cfg.select_metric
    retrieval = {"imu_video_r1": "video", "imu_text_r1": "text"}
    if m == "auto":
        for name, target in retrieval.items():
            if target in cfg.targets:
                return name, f"auto: IMU->{target} R@1 on the validation windows (higher is better)"
        return "val_loss", "auto: no retrieval target (video or text) is trained, so the lowest validation loss"
    if m not in SELECT_METRICS:
        raise TrainSetupError(f"select_metric must be 'auto' or one of {list(SELECT_METRICS)}, got {m!r}")
    if m in retrieval and retrieval[m] not in cfg.targets:
        raise TrainSetupError(f"select_metric={m!r} needs {retrieval[m]!r} in targets, got targets="
                              f"{list(cfg.targets)}")
    return m, ("given: the lowest validation loss" if m == "val_loss"
               else f"given: IMU->{retrieval[m]} R@1 on the validation windows (higher is better)")


def recall_at_1(q: torch.Tensor, g: torch.Tensor, block: int = 1024) -> float:
    """The fraction of queries ``q[i]`` whose own candidate ``g[i]`` scores highest among all of ``g`` (``q``, ``g``:
    ``(N, D)`` L2-normalised, ``N >= 1``). As in :func:`imu2clip_plugin.metrics.retrieval_ranks`, a query's rank is
    1 + the candidates scored strictly higher than its own (ties count for the query); computed in blocks of
    ``block`` queries, so memory stays ``block x N``."""
    hits = 0
    for s in range(0, len(q), block):
        sim = q[s:s + block] @ g.T
        rows = torch.arange(len(sim), device=sim.device)
        own = sim[rows, rows + s]
        hits += int(((sim > own[:, None]).sum(1) == 0).sum())
    return hits / len(q)


def _val_recall(parts: list[tuple], targets: Sequence[str], device: torch.device) -> dict[str, float]:
    """``{"imu_<target>_r1": R@1}`` over the validation batches ``parts`` of every rank: ``(window indices, IMU
    embeddings, {target: embeddings})``, each window counted once; NaN with fewer than 2 windows."""
    out = {f"imu_{t}_r1": float("nan") for t in targets}
    if not parts:
        return out
    _, first = np.unique(np.concatenate([p[0] for p in parts]), return_index=True)
    if len(first) < 2:
        return out
    z = torch.from_numpy(np.concatenate([p[1] for p in parts])[first]).to(device)
    for t in targets:
        g = torch.from_numpy(np.concatenate([p[2][t] for p in parts])[first]).to(device)
        out[f"imu_{t}_r1"] = recall_at_1(z, g)
    return out


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

    # several ranks opening a store that mmloader prepares itself (sample:ego4d, a name with root=): one prepares
    # per folder, the others wait (mmloader.coordinate)
    ds = mmloader.open(cfg.store, **{"progress": cfg.progress, **cfg.store_options})
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
                out["text"] = self.towers.encode_text([text_of(t) for t in batch["text"]])
        return out


def _sub_url(url: str, part: str) -> str:
    return url if url == "auto" else url.rstrip("/") + "/" + part


# -- training ----------------------------------------------------------------------------------------
class Trainer:
    """One training run of ``cfg`` (see :func:`train` for the contract). The stages, in the order :meth:`fit`
    runs them:

    - :meth:`setup`: join the process group, read and check the checkpoint to resume (before anything is built or
      written), seed the RNGs, build the towers, the windows (and their embedding caches), the model, the
      optimiser, the loader, the LR schedule and AMP;
    - :meth:`resume`: restore that checkpoint into them, then open the run directory (its first write);
    - :meth:`step` (one optimisation step on a batch), :meth:`validate` (the mean validation loss over all ranks,
      and the IMU→target R@1) and :meth:`checkpoint` (``run_dir/checkpoint.pt``), as the epochs go;
    - :meth:`fit`: all of the above; returns :func:`train`'s result dict.

    State: ``global_step`` (optimiser steps taken), ``history`` (validation losses), ``val_metrics`` (the last
    validation's ``val_loss`` and ``imu_<target>_r1``), ``last_val_step`` (the step of the last validation that
    counts for resuming; -1 before any), ``stopped`` (``stop_after_steps`` reached), ``best`` (None, or the best
    validation so far by ``select``: metric, value, epoch, step and the encoder's weights then), ``bad_epochs``
    (validations since the best), ``stopped_by_patience`` (``early_stop_patience`` ran out).
    """

    def __init__(self, cfg: TrainConfig, windows=None, towers=None):
        self.cfg = cfg
        self.windows = windows
        self.towers = towers
        self.run = RunDir(cfg.run_dir, cfg.run_storage_options)
        self.run_dir = self.run.location          # a Path, or the URL
        self.checkpoint_path = self.run.file(CHECKPOINT_NAME)
        self.select, self.select_reason = resolve_select_metric(cfg)
        self.global_step, self.history, self.last_val_step = 0, [], -1
        self.val_metrics: dict[str, float] = {}
        self.best: dict[str, Any] | None = None
        self.bad_epochs, self.stopped_by_patience = 0, False
        self.last_loss, self.stopped = float("nan"), False
        self._to_resume: dict[str, Any] | None = None
        self._ready = self._opened = False
        self._bar = None
        self.metrics: MetricsLog | None = None

    def _so(self) -> dict[str, Any]:
        """``storage_options=`` for the checkpoint functions, when the run folder is a URL."""
        return {"storage_options": self.run.storage_options} if self.run.remote else {}

    # -- setup ------------------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        """Build everything the run needs; nothing in ``run_dir`` is written yet. Raises :class:`TrainSetupError`
        (a :class:`CheckpointError` for a checkpoint refused before anything is built)."""
        cfg = self.cfg
        self.rank, self.world, self.device = init_distributed(cfg.device)
        self.metrics = MetricsLog(self.run, METRICS_NAME, enabled=self.rank == 0)
        self._check_shared_run_dir()
        self._to_resume = self._checkpoint_to_resume()   # every rank reads and checks it, before building anything
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self._build_towers()
        self._build_data()
        torch.manual_seed(cfg.seed)
        self._build_model()
        self._build_loader()
        self._build_schedule()
        self._ready = True
        return self

    def _checkpoint_to_resume(self) -> dict[str, Any] | None:
        """The checked checkpoint to continue from, or None to start fresh (``resume`` False, or "auto" with none
        there). A fresh start into a run dir holding a checkpoint needs ``overwrite``: :class:`RunDirInUseError`."""
        cfg, run_dir = self.cfg, self.run_dir
        so = self.run.storage_options
        has_checkpoint = bool(checkpoint_files(run_dir, so))
        if not cfg.resume:
            if has_checkpoint and not cfg.overwrite:
                raise RunDirInUseError(
                    f"{run_dir}: this run directory already holds {CHECKPOINT_NAME} (step "
                    f"{recorded_step(run_dir, so)}); refusing to start over and replace it and {METRICS_NAME}: pass "
                    "--resume to continue it, --resume auto to continue it if there is one, or --overwrite to start "
                    "over (TrainConfig resume=True / resume='auto' / overwrite=True), or use another run_dir")
            return None
        if not has_checkpoint:
            if cfg.resume == "auto":
                return None
            raise CheckpointError(f"{run_dir}: nothing to resume: no {CHECKPOINT_NAME} in this run directory (train "
                                  "without resume to start a run, or resume='auto' to continue only if there is one)")
        ck = load_checkpoint(self.checkpoint_path, map_location="cpu", **self._so())
        check_checkpoint(ck, self.checkpoint_path)
        return ck

    def _run_dir_view(self) -> str:
        """What this rank sees of the run folder's checkpoint: its checksum record's digest, or its absence."""
        try:
            rec = self.run.read_bytes(CHECKPOINT_NAME + CHECKSUM_SUFFIX)
        except FileNotFoundError:
            return "no checkpoint"
        except OSError as e:
            return f"an unreadable checkpoint record ({type(e).__name__})"
        return f"checkpoint record sha256 {hashlib.sha256(rec).hexdigest()[:12]}"

    def _not_shared(self, detail: str) -> TrainSetupError:
        return TrainSetupError(
            f"{self.run_dir}: the ranks do not see the same run folder ({detail}); the run folder must be one folder "
            "every rank and node sees (a shared filesystem, or a URL such as s3://bucket/runs/name): rank 0 writes "
            "the checkpoints there and every rank resumes from them. Stores and caches may be node-local copies; "
            "the run folder may not")

    def _check_shared_run_dir(self) -> None:
        """Every rank sees the same checkpoint in the run folder (else :class:`TrainSetupError` on every rank)."""
        if self.world == 1:
            return
        views = all_gather_objects(self._run_dir_view())
        if len(set(views)) > 1:
            raise self._not_shared("; ".join(f"rank {r} sees {v}" for r, v in enumerate(views)))

    def _build_towers(self) -> None:
        if self.towers is None:
            from .towers import ClipTowers

            cfg = self.cfg
            self.towers = ClipTowers(cfg.model_name, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint,
                                     device=self.device)
        else:
            self.towers = self.towers.to(self.device)

    def _build_data(self) -> None:
        """``train_ws`` / ``val_ws``: the split windows, served from their embedding caches with ``use_cache``."""
        cfg = self.cfg
        with _setup_checks():
            if self.windows is None:
                self.windows = _open_windows(cfg)
            self.train_ws, self.val_ws = split_train_val(self.windows, cfg)
        if cfg.use_cache:
            self.train_ws = self._embedding_cache(self.train_ws, "train")
            self.val_ws = self._embedding_cache(self.val_ws, "val")

    def _embedding_cache(self, windows, part: str):
        """Rank 0 fills the cache of ``windows`` now; the other ranks wait for it, then open it (filling lazily
        whatever is still missing)."""
        from .embed import build_embedding_cache

        url, reduce = _sub_url(self.cfg.cache_url, part), self.cfg.reduce
        if self.rank == 0:
            windows = build_embedding_cache(windows, self.towers, url=url, reduce=reduce)
        barrier()
        if self.rank != 0:
            windows = build_embedding_cache(windows, self.towers, url=url, reduce=reduce, fill="lazy")
        return windows

    def _build_model(self) -> None:
        """The encoder + loss (``model``; ``ddp`` wraps it with several ranks) and AdamW, without weight decay on
        biases, norms and the temperature."""
        cfg, device = self.cfg, self.device
        enc_cfg = IMUEncoderConfig.from_dict({**cfg.encoder, "embed_dim": self.towers.embed_dim})
        self.model = _Model(IMUEncoder(enc_cfg), ContrastiveLoss(cfg.targets, weights=cfg.target_weights)).to(device)
        self.ddp = self.model
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)

    def _build_loader(self) -> None:
        """This rank's loader over the train windows, and ``total``, the run's number of steps."""
        cfg = self.cfg
        with _setup_checks():
            self.loader = self.train_ws.loader(batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed,
                                               num_workers=cfg.num_workers, drop_last=True,
                                               even_shards=self.world > 1, pin_memory=self.device.type == "cuda")
        steps_per_epoch = len(self.loader)
        if steps_per_epoch == 0:
            raise TrainSetupError(f"{len(self.train_ws)} train windows on this rank is less than one batch of "
                                  f"{cfg.batch_size}: lower batch_size, or give more data (a smaller stride, more "
                                  "recordings)")
        self.total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch

    def _build_schedule(self) -> None:
        """The LR schedule, AMP (CUDA only) with its loss scaler (float16 only: bfloat16 has float32's range), and
        the batch → target embeddings function."""
        cfg, device = self.cfg, self.device
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg.warmup_steps, self.total))
        self.use_amp = bool(cfg.amp and device.type == "cuda")
        self.amp_dtype = _amp_dtype(cfg.amp_dtype, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.targets = _Targets(self.towers, cfg.targets, cfg.reduce, device)

    # -- resume and the run directory ------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the checkpoint :meth:`setup` accepted (if any), checking that it fits the model and the
        loader (:class:`CheckpointError`); then open the run directory: with ``overwrite`` the old checkpoint goes,
        ``metrics.jsonl`` keeps only the records up to the resumed step (a fresh run: a new one), ``config.json``
        is written. Only here, with the data, the model and any checkpoint accepted, is ``run_dir`` written to."""
        ck, self._to_resume = self._to_resume, None
        resumed = ck is not None
        if ck is not None:
            self.global_step, self.history, self.last_val_step = restore_checkpoint(
                ck, self.checkpoint_path, model=self.model, opt=self.opt, sched=self.sched, scaler=self.scaler,
                loader=self.loader, rank=self.rank, world=self.world, total=self.total)
            self.best, self.bad_epochs, _ = restore_best(ck, self.checkpoint_path, self.model.encoder, self.select)
            # from this run's config: a resume with more patience (or none) goes on where the last one stopped
            patience = self.cfg.early_stop_patience
            self.stopped_by_patience = patience is not None and self.bad_epochs >= patience
            del ck
        if self.rank == 0:
            self.run.makedirs()
            if self.cfg.overwrite:   # start over: the old checkpoint goes (its record first: nothing half-valid)
                remove_checkpoint(self.run_dir, self.run.storage_options)
                self.run.remove(SUMMARY_NAME)
                self.run.remove("encoder")
            self.metrics.start(self.global_step if resumed else None)
            self.run.write("config.json", (json.dumps(self.cfg.to_dict(), indent=2) + "\n").encode())
        barrier()
        if self.world > 1:   # a node-local run folder shows here on a fresh start (on resume: in setup)
            seen = all_gather_objects(self.run.exists("config.json"))
            if not all(seen):
                raise self._not_shared(f"rank(s) {[r for r, ok in enumerate(seen) if not ok]} do not see the "
                                       "config.json rank 0 just wrote")
        self._opened = True

    def log(self, rec: dict[str, Any]) -> None:
        """Append one record to ``metrics.jsonl`` (rank 0)."""
        self.metrics.append(rec)

    # -- the loop ---------------------------------------------------------------------------------------
    def step(self, batch: dict[str, Any]) -> float:
        """One optimisation step on ``batch`` (forward under autocast, backward through the loss scaler, gradient
        clipping, AdamW, the schedule, the temperature clamp), logged; returns the batch's loss."""
        cfg, device, model = self.cfg, self.device, self.model
        imu, mask = batch["imu"].to(device, non_blocking=True), batch["imu_mask"].to(device, non_blocking=True)
        tg = self.targets(batch)
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            loss = self.ddp(imu, mask, **tg)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        gnorm = None
        if cfg.grad_clip:
            self.scaler.unscale_(self.opt)
            gnorm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        model.loss.clamp_()
        self.global_step += 1
        self.last_loss = float(loss.detach())
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{self.last_loss:.4f}")
        self.log({"event": "train", "step": self.global_step, "epoch": self.loader.epoch, "loss": self.last_loss,
                  "lr": self.sched.get_last_lr()[0], "grad_norm": gnorm,
                  "logit_scale": float(model.loss.logit_scale.detach())})
        return self.last_loss

    @torch.no_grad()
    def validate(self) -> float:
        """The mean loss over the validation windows of every rank (NaN when no batch had 2 windows). Also sets
        ``val_metrics``: ``val_loss`` and, for each target, ``imu_<target>_r1``, the IMU→target R@1 over the
        validation windows of every rank (each window's IMU embedding against all of theirs; computed on rank 0 and
        shared, so every rank takes the same decisions from it)."""
        cfg, device, model = self.cfg, self.device, self.model
        model.eval()
        # a fixed shuffled order (same batches every time): batches mix recordings, as in training
        vl = self.val_ws.loader(batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, num_workers=0,
                                even_shards=self.world > 1)
        tot = torch.zeros(2, dtype=torch.float64, device=device)
        parts = []
        for b in vl:
            n = len(b["index"])
            tg = self.targets(b)
            with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                z = model.encoder(b["imu"].to(device), b["imu_mask"].to(device), normalize=True).float()
                loss = model.loss(z, **tg) if n >= 2 else None
            parts.append((torch.as_tensor(b["index"]).cpu().numpy(), z.cpu().numpy(),
                          {k: v.float().cpu().numpy() for k, v in tg.items()}))
            if loss is not None:
                tot += torch.tensor([float(loss) * n, n], dtype=torch.float64, device=device)
        all_reduce_sum(tot)
        model.train()
        v = float(tot[0] / tot[1]) if tot[1] > 0 else float("nan")
        gathered = gather_objects(parts)
        recall = _val_recall([p for ps in gathered for p in ps], cfg.targets, device) if self.rank == 0 else None
        self.val_metrics = {"val_loss": v, **broadcast_object(recall)}
        return v

    def checkpoint(self) -> None:
        """Save ``run_dir/checkpoint.pt`` (rank 0; every rank's loader position and RNG states gathered into it),
        then wait for every rank."""
        gathered = all_gather_objects((self.loader.state_dict(), rng_state()))
        states, rngs = [g[0] for g in gathered], [g[1] for g in gathered]
        if self.rank == 0:
            model = self.model
            self.metrics.flush()  # first: the records up to this step are never lost behind a saved checkpoint
            save_checkpoint({"format_version": CHECKPOINT_FORMAT_VERSION, "model": model.state_dict(),
                             "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                             "scaler": self.scaler.state_dict(), "logit_scale": float(model.loss.logit_scale.detach()),
                             "loader": states if self.world > 1 else states[0],
                             "rng": rngs if self.world > 1 else rngs[0],
                             "step": self.global_step, "epoch": self.loader.epoch, "val_history": self.history,
                             "last_val_step": self.last_val_step, "config": self.cfg.to_dict(),
                             "best": self.best, "bad_epochs": self.bad_epochs,
                             "early_stopped": self.stopped_by_patience}, self.checkpoint_path, **self._so())
        barrier()

    def _log_validation(self, epoch: int, candidate: bool = True) -> None:
        """Validate and log it; a ``candidate`` (every validation after training steps: each comes with a
        checkpoint) may become the best."""
        v = self.validate()
        self.history.append(v)
        rec = {"event": "val", "step": self.global_step, "epoch": epoch, **self.val_metrics}
        if candidate:
            rec["best"] = self._consider_best(epoch)
        self.log(rec)

    def _consider_best(self, epoch: int) -> bool:
        """Keep this validation as the best when its ``select`` metric improves on the best so far (strictly: R@1
        higher, loss lower; a NaN never does); else count it in ``bad_epochs``. Returns whether it improved."""
        value = self.val_metrics.get(self.select, float("nan"))
        best = self.best
        better = (best is None or (value < best["value"] if self.select == "val_loss" else value > best["value"]))
        if not (math.isfinite(value) and better):
            self.bad_epochs += 1
            return False
        self.best = {"metric": self.select, "value": float(value), "epoch": int(epoch), "step": self.global_step,
                     "encoder": {k: v.detach().cpu().clone() for k, v in self.model.encoder.state_dict().items()}}
        self.bad_epochs = 0
        return True

    def _run_epoch(self) -> bool:
        """Steps through the loader from its position; True when the epoch's windows are all used (the loop ran
        out, or the last step consumed the epoch's last batch), False when stopped or cut short by ``total``."""
        for batch in self.loader:
            self.step(batch)
            if self.cfg.stop_after_steps is not None and self.global_step >= self.cfg.stop_after_steps:
                self.stopped = True
                return False
            if self.global_step >= self.total:
                return self.loader.offset >= len(self.loader.order(self.loader.epoch))
        return True

    def fit(self) -> dict[str, Any]:
        """Run (calling :meth:`setup` and :meth:`resume` first unless already called): validate at step 0 of a
        fresh run, then epochs of steps, each completed epoch validated and checkpointed; a final validation (unless
        stopped or just done), checkpoint, and the encoder's export to ``run_dir/encoder`` (rank 0, unless
        stopped)."""
        from tqdm.auto import tqdm

        if not self._ready:
            self.setup()
        if not self._opened:
            self.resume()
        if self.global_step == 0 and not self.history:
            self._log_validation(self.loader.epoch, candidate=False)
        self.model.train()
        self._bar = tqdm(total=self.total, initial=self.global_step, disable=self.rank != 0 or not self.cfg.progress,
                         desc="train", dynamic_ncols=True)
        t_start = time.perf_counter()
        patience = self.cfg.early_stop_patience
        while self.global_step < self.total and not self.stopped and not self.stopped_by_patience:
            if self._run_epoch() and not self.stopped:
                if self.loader.offset != 0:  # broke out exactly at the end of the epoch: start the next one
                    self.loader.set_epoch(self.loader.epoch + 1)
                self.last_val_step = self.global_step
                self._log_validation(self.loader.epoch - 1)
                self.stopped_by_patience = patience is not None and self.bad_epochs >= patience
                self.checkpoint()
        self._bar.close()
        self._bar = None
        if not self.stopped and self.last_val_step != self.global_step:
            self.last_val_step = self.global_step
            self._log_validation(self.loader.epoch)
        self.checkpoint()
        return self._finish(time.perf_counter() - t_start)

    def _export_encoder(self) -> str:
        """Write the best encoder (the last one when no validation gave a value) to ``run_dir/encoder``; returns
        where. A URL run folder gets the files uploaded from a temporary folder, the weights first."""
        encoder = self.model.encoder
        if self.best is not None:
            encoder = copy.deepcopy(encoder)
            encoder.load_state_dict(self.best["encoder"])
        if not self.run.remote:
            return str(save_encoder(encoder, self.run.file("encoder")))
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            save_encoder(encoder, d)
            return self.run.upload(d, "encoder", order=[WEIGHTS_NAME, CONFIG_NAME])

    def _finish(self, seconds: float) -> dict[str, Any]:
        """The end of :meth:`fit`: rank 0 exports the encoder (unless stopped) and writes ``summary.json``, the
        result (without the model)."""
        enc_dir = self._export_encoder() if not self.stopped and self.rank == 0 else None
        best = None if self.best is None else {k: self.best[k] for k in ("metric", "value", "epoch", "step")}
        out = {"step": self.global_step, "epoch": self.loader.epoch, "train_loss": self.last_loss,
               "val_loss": self.history[-1] if self.history else None, "val_history": self.history,
               "run_dir": str(self.run_dir), "encoder_dir": enc_dir, "stopped_early": self.stopped,
               "stopped_by_patience": self.stopped_by_patience, "select_metric": self.select,
               "select_reason": self.select_reason, "best": best,
               "exported": None if enc_dir is None else ("best" if best is not None else "last")}
        self.log({"event": "end", "step": self.global_step, "stopped_early": self.stopped,
                  "stopped_by_patience": self.stopped_by_patience, "best": best, "seconds": seconds})
        if self.rank == 0:
            self.run.write(SUMMARY_NAME, (json.dumps(out, indent=2) + "\n").encode())
            self.metrics.flush()
        return {**out, "model": self.model}


def train(cfg: TrainConfig, windows=None, towers=None) -> dict[str, Any]:
    """Train; returns ``{"step", "epoch", "train_loss", "val_loss", "val_history", "run_dir", "encoder_dir",
    "stopped_early", "stopped_by_patience", "select_metric", "select_reason", "best", "exported", "model"}``, and
    rank 0 writes the same (without ``model``) to ``run_dir/summary.json``. ``windows`` / ``towers`` may be passed
    in (else built from ``cfg``).

    The best checkpoint: every validation after training steps (each epoch's, and the last) is a candidate;
    ``best`` is ``{"metric", "value", "epoch", "step"}`` of the one with the best ``select_metric`` (the first
    wins a tie; ``epoch`` as in ``metrics.jsonl``'s ``val`` records, from 0), and the encoder exported to
    ``run_dir/encoder`` (``encoder_dir``; not when ``stopped_early``) has its weights (``exported`` "best"; "last"
    when no validation gave a value). With ``early_stop_patience`` N, training stops after N epochs in a row
    without improvement (``stopped_by_patience``). The best-so-far state is part of the checkpoint.

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
    return Trainer(cfg, windows=windows, towers=towers).fit()
