"""Embedding cache: IMU windows plus frozen-tower embeddings, materialised through mmloader's window cache.

``EmbeddedWindows(windows, towers)`` is a :class:`mmloader.windows.dataset.WindowSet` whose samples carry the IMU keys
(``imu``, ``imu_mask``...), the index fields (``text``, ``recording_id``, ``t0``...) and

- ``video_emb (D,)`` float32: ``towers.encode_frames(video, reduce=...)`` of the window's frames (when the set
  has a video stream);
- ``text_emb (D,)`` float32: ``towers.encode_text(text)`` of the narration (when the set has ``text``; a list of
  narrations, in tile mode, is joined with ``". "``),

and **no** raw ``video`` / ``video_t`` keys. Tower calls are batched: the first read of a window embeds its
whole block of ``block_size`` windows at once (the window cache reads a shard at a time, so with
``block_size == shard_size`` a shard costs one tower call per modality).

:func:`build_embedding_cache` wraps it in ``WindowSet.cache(...)`` with a ``transforms`` fingerprint of the towers
(model name, pretrained tag, checkpoint file, preprocessing, a hash of the weights when they are random) and of
``reduce``, so a training loop over the returned set reads IMU + embeddings from the cache and never decodes video.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from typing import Any

import torch

from mmloader.windows.dataset import WindowSet

EMBED_FORMAT = 1
REDUCES = ("center", "mean")


def towers_fingerprint(towers: Any, reduce: str = "center") -> str:
    """An identifier of everything that decides the embeddings: passed as ``transforms=`` to the window cache."""
    ckpt = getattr(towers, "checkpoint", None)
    ckpt_id = None
    if ckpt is not None:
        st = os.stat(ckpt)
        ckpt_id = {"path": os.path.abspath(ckpt), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    weights = None
    if getattr(towers, "pretrained", None) is None and ckpt is None:
        # random init: the weights themselves are what identifies the towers
        h = hashlib.sha256()
        for k, v in sorted(towers.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        weights = h.hexdigest()[:32]
    comp = {
        "kind": "imu2clip-embeddings", "format": EMBED_FORMAT,
        "model": towers.model_name, "pretrained": getattr(towers, "pretrained", None), "checkpoint": ckpt_id,
        "weights_sha256": weights, "image_size": list(towers.image_size), "resize_mode": towers.resize_mode,
        "interpolation": str(towers.interpolation), "fill_color": towers.fill_color,
        "mean": [round(float(x), 8) for x in towers.mean.flatten().tolist()],
        "std": [round(float(x), 8) for x in towers.std.flatten().tolist()],
        "reduce": reduce,
    }
    digest = hashlib.sha256(json.dumps(comp, sort_keys=True).encode()).hexdigest()[:16]
    return f"imu2clip-emb/v{EMBED_FORMAT}:{towers.model_name}:{reduce}:{digest}"


def text_of(t: Any) -> str:
    """The one string a window's ``text`` is embedded as (narrations joined with ". "), in training, in the
    embedding cache and in evaluation alike."""
    if t is None:
        return ""
    if isinstance(t, (list, tuple)):
        return ". ".join(str(x) for x in t)
    return str(t)


class EmbeddedWindows(WindowSet):
    """``windows`` with frozen-tower embeddings instead of raw video (see the module docstring)."""

    def __init__(self, windows: WindowSet, towers: Any, reduce: str = "center", block_size: int = 32):
        if windows.window_cache is not None:
            windows = windows.window_cache.source
        super().__init__(windows._store, windows.spec, windows.index, windows._report, windows.reader_capacity)
        if reduce not in REDUCES:
            raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
        self.towers = towers
        self.reduce = reduce
        self.block_size = int(block_size)
        self._emb: OrderedDict[int, list[dict[str, Any]]] = OrderedDict()
        self._emb_lock = threading.Lock()

    @property
    def video_key(self) -> str | None:
        return self.modalities.video[0] if self.modalities.video else None

    def raw(self, i: int) -> dict[str, Any]:
        """The source sample of window ``i`` (with its video), as the plain WindowSet gives it."""
        return WindowSet.__getitem__(self, i)

    @torch.no_grad()
    def _embed_block(self, b: int) -> list[dict[str, Any]]:
        start, stop = b * self.block_size, min((b + 1) * self.block_size, len(self))
        samples = [self.raw(i) for i in range(start, stop)]
        v = self.video_key
        drop = {k for vv in self.modalities.video for k in (vv, f"{vv}_t")}
        out = [{k: val for k, val in s.items() if k not in drop} for s in samples]
        if v is not None:
            video = torch.stack([s[v] for s in samples])
            emb = self.towers.encode_frames(video, reduce=self.reduce).float().cpu()
            for o, e in zip(out, emb):
                o["video_emb"] = e.clone()
        if self.modalities.text:
            emb = self.towers.encode_text([text_of(s.get("text")) for s in samples]).float().cpu()
            for o, e in zip(out, emb):
                o["text_emb"] = e.clone()
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"window {i} out of range ({n} windows)")
        i = int(i) % n
        b, j = divmod(i, self.block_size)
        with self._emb_lock:
            block = self._emb.get(b)
            if block is None:
                block = self._embed_block(b)
                self._emb[b] = block
                while len(self._emb) > 2:
                    self._emb.popitem(last=False)
        return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in block[j].items()}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_emb"] = OrderedDict()
        del state["_emb_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._emb_lock = threading.Lock()


def build_embedding_cache(windows: WindowSet, towers: Any, url: str = "auto", reduce: str = "center",
                          fill: str = "eager", progress: bool = False, shard_size: int | None = None,
                          overwrite: bool = False, **storage_options: Any) -> WindowSet:
    """A set serving ``EmbeddedWindows(windows, towers, reduce)`` from mmloader's window cache at ``url``.

    The cache key includes :func:`towers_fingerprint` (model, weights, preprocessing, ``reduce``), so other towers
    or another ``reduce`` never reuse these embeddings. ``fill="eager"`` (default) embeds every window now, so a
    training loop afterwards never decodes video; ``"lazy"`` embeds a shard the first time one of its windows is
    read. Publishing is atomic per shard (mmloader's cache writes then commits).
    """
    from mmloader.cache import DEFAULT_SHARD_SIZE

    shard = shard_size or DEFAULT_SHARD_SIZE
    src = EmbeddedWindows(windows, towers, reduce=reduce, block_size=shard)
    return src.cache(url, fill=fill, progress=progress, transforms=towers_fingerprint(towers, reduce),
                     shard_size=shard, overwrite=overwrite, **storage_options)
