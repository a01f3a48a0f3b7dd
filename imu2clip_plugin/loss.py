"""Symmetric InfoNCE between IMU embeddings and frozen CLIP embeddings, with negatives from every rank.

For one target (video or text), a batch of N pairs ``(q_i, k_i)`` of L2-normalised embeddings and the scale
``s = exp(logit_scale)`` (an inverse temperature)::

    logits = s · q kᵀ                         (N, N)
    loss   = ½ · [ CE(logits, diag) + CE(logitsᵀ, diag) ]      each CE a mean over its N rows

``ContrastiveLoss(targets=("video", "text"))`` sums the IMU↔video and IMU↔text terms (one shared scale).

Distributed negatives: when ``torch.distributed`` is initialised with world size W > 1, every rank all-gathers
the queries and keys of all ranks (``gather_with_grad``, whose backward all-reduces the incoming gradient and
keeps this rank's slice) and scores its own B rows against all W·B columns; labels are offset by the number of
rows of the ranks before it. Each rank's loss is the mean over its own rows. With equal per-rank batches, the
mean of the W rank losses is exactly the single-process loss over the concatenated W·B batch, and averaging the
parameter gradients across ranks (what DDP does) gives exactly that loss's gradient: the all-reduce in the
gather's backward carries every rank's contribution to this rank's embeddings back to it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import rank_world

TARGETS = ("video", "text")
INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gradient over ranks and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], rank: int) -> Tensor:  # type: ignore[override]
        n_max = max(sizes)
        pad = x.new_zeros((n_max - x.shape[0], *x.shape[1:]))
        parts = [torch.empty((n_max, *x.shape[1:]), dtype=x.dtype, device=x.device) for _ in sizes]
        dist.all_gather(parts, torch.cat([x, pad]).contiguous())
        ctx.offset, ctx.n = sum(sizes[:rank]), sizes[rank]
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.offset:ctx.offset + ctx.n], None, None


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """All-gather ``x (B_r, ...)`` from every rank into ``(ΣB, ...)``, gradient-preserving.

    Returns ``(gathered, offset)`` where ``offset`` is where this rank's rows start. Without an initialised
    process group (or with one rank) returns ``(x, 0)``. Per-rank batch sizes may differ (they are exchanged
    first); every rank must call this in the same order, as with any collective.
    """
    rank, world = rank_world()
    if world == 1:
        return x, 0
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    ns = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(ns, n)
    sizes = [int(t.item()) for t in ns]
    return _GatherWithGrad.apply(x, sizes, rank), sum(sizes[:rank])


DUPLICATE_COS = 1.0 - 1e-5
"""Keys whose cosine reaches this are the same target (the same narration text, the same frame)."""


def info_nce(q: Tensor, k: Tensor, logit_scale: Tensor, q_all: Tensor | None = None, k_all: Tensor | None = None,
             offset: int = 0, mask_duplicates: bool = False) -> Tensor:
    """Symmetric InfoNCE for L2-normalised pairs, mean of the two directions.

    Args:
        q, k: ``(B, D)`` this rank's queries (IMU) and keys (video or text), row i of q pairs with row i of k.
        logit_scale: scalar, the scale is ``exp(logit_scale)`` (already clamped by the caller).
        q_all, k_all: ``(N, D)`` negatives pool (all ranks' q and k); default ``q`` and ``k`` (N = B).
        offset: index of this rank's first row inside ``q_all``/``k_all``.
        mask_duplicates: drop from both softmaxes the pairs whose key duplicates row i's key (cosine >=
            ``DUPLICATE_COS``, e.g. two windows narrated with the same sentence): they are not negatives.

    Returns:
        scalar: ``½ (CE(s·q k_allᵀ) + CE(s·k q_allᵀ))``, each a mean over the B rows, labels ``offset + i``.
    """
    q_all = q if q_all is None else q_all
    k_all = k if k_all is None else k_all
    scale = logit_scale.exp()
    labels = torch.arange(q.shape[0], device=q.device) + offset
    logits_qk, logits_kq = scale * q @ k_all.T, scale * k @ q_all.T
    if mask_duplicates:
        with torch.no_grad():
            dup = (k.detach() @ k_all.detach().T) >= DUPLICATE_COS            # (B, N): key j is row i's target
            dup[torch.arange(q.shape[0], device=q.device), labels] = False
        logits_qk = logits_qk.masked_fill(dup, float("-inf"))
        logits_kq = logits_kq.masked_fill(dup, float("-inf"))
    loss_qk = F.cross_entropy(logits_qk, labels)
    loss_kq = F.cross_entropy(logits_kq, labels)
    return 0.5 * (loss_qk + loss_kq)


class ContrastiveLoss(nn.Module):
    """IMU↔video / IMU↔text symmetric InfoNCE with a learnable temperature and cross-rank negatives.

    Args:
        targets: which targets are scored, any of ``"video"``, ``"text"``; with both the loss is their sum.
        init_logit_scale: initial ``logit_scale`` (natural log of the inverse temperature), CLIP's ``log(1/0.07)``.
        max_logit_scale: the scale used is ``exp(min(logit_scale, max_logit_scale))``, CLIP's ``log(100)``.
        learnable_scale: train ``logit_scale`` (else it is a fixed buffer).
        gather: pool negatives across ranks when ``torch.distributed`` is initialised with world size > 1.
        mask_duplicates: duplicated targets in the pool (the same narration sentence for several windows) are not
            used as negatives of each other (see :func:`info_nce`).
        weights: per-target weight of its term in the sum (default 1 each, the paper's plain sum).

    ``forward(imu, video=None, text=None) -> scalar``: each input ``(B, D)`` and L2-normalised (the towers'
    outputs and ``IMUEncoder(..., normalize=True)``); targets not listed in ``targets`` are ignored.
    """

    def __init__(self, targets: Sequence[str] = ("video",), init_logit_scale: float = INIT_LOGIT_SCALE,
                 max_logit_scale: float = MAX_LOGIT_SCALE, learnable_scale: bool = True, gather: bool = True,
                 mask_duplicates: bool = True, weights: dict[str, float] | None = None):
        super().__init__()
        if isinstance(targets, str):
            targets = (targets,)
        targets = tuple(targets)
        bad = [t for t in targets if t not in TARGETS]
        if not targets or bad or len(set(targets)) != len(targets):
            raise ValueError(f"targets must be a non-empty subset of {TARGETS} without repeats, got {targets}")
        self.targets = targets
        self.max_logit_scale = float(max_logit_scale)
        self.gather = gather
        self.mask_duplicates = mask_duplicates
        weights = dict(weights or {})
        if set(weights) - set(targets) or any(float(w) < 0 for w in weights.values()):
            raise ValueError(f"weights {weights} must be non-negative and name only the targets {targets}")
        self.weights = {t: float(weights.get(t, 1.0)) for t in targets}
        init = torch.tensor(float(init_logit_scale))
        if learnable_scale:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)

    def scale(self) -> Tensor:
        """The clamped inverse temperature ``exp(min(logit_scale, max_logit_scale))`` (scalar tensor)."""
        return self.clamped_logit_scale().exp()

    def clamped_logit_scale(self) -> Tensor:
        return self.logit_scale.clamp(max=self.max_logit_scale)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp the stored ``logit_scale`` in place (call after ``optimizer.step()``, as CLIP does)."""
        self.logit_scale.clamp_(max=self.max_logit_scale)

    def terms(self, imu: Tensor, video: Tensor | None = None, text: Tensor | None = None) -> dict[str, Tensor]:
        """The per-target losses, e.g. ``{"video": ..., "text": ...}`` (scalars); ``forward`` is their sum."""
        given = {"video": video, "text": text}
        missing = [t for t in self.targets if given[t] is None]
        if missing:
            raise ValueError(f"ContrastiveLoss(targets={self.targets}) needs {missing} embeddings")
        rank, world = rank_world()
        distributed = self.gather and world > 1
        ls = self.clamped_logit_scale()
        q_all, offset = gather_with_grad(imu) if distributed else (imu, 0)
        out = {}
        for t in self.targets:
            k = given[t]
            if k.shape != imu.shape:
                raise ValueError(f"imu {tuple(imu.shape)} and {t} {tuple(k.shape)} embeddings must have the same shape")
            k_all = gather_with_grad(k)[0] if distributed else k
            out[t] = info_nce(imu, k, ls, q_all, k_all, offset, mask_duplicates=self.mask_duplicates)
        return out

    def forward(self, imu: Tensor, video: Tensor | None = None, text: Tensor | None = None) -> Tensor:
        return sum(self.weights[t] * v for t, v in self.terms(imu, video, text).items())  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return (f"targets={self.targets}, weights={self.weights}, max_logit_scale={self.max_logit_scale:.4f}, "
                f"gather={self.gather}, mask_duplicates={self.mask_duplicates}")
