"""Embedding cache: IMU windows plus frozen-tower embeddings, materialised through mmloader's window cache.

``EmbeddedWindows(windows, towers)`` wraps a window set (a :class:`mmloader.windows.protocol.Windows`, which it is
too); its samples carry the IMU keys
(``imu``, ``imu_mask``...), the index fields (``text``, ``recording_id``, ``t0``...) and

- ``video_emb (D,)`` float32: ``towers.encode_frames(video, reduce=...)`` of the window's frames (when the set
  has a video stream);
- ``text_emb (D,)`` float32: ``towers.encode_text(text)`` of the narration (when the set has ``text``; a list of
  narrations, in tile mode, is joined with ``". "``),

and **no** raw ``video`` / ``video_t`` keys. Tower calls are batched: the first read of a window embeds its
whole block of ``block_size`` windows at once (the window cache reads a shard at a time, so with
``block_size == shard_size`` a shard costs one tower call per modality).

:func:`build_embedding_cache` wraps it in mmloader's window cache with a ``transforms`` fingerprint of the towers
(model name, pretrained tag, checkpoint file, preprocessing, a hash of the weights when they are random) and of
``reduce``, so a training loop over the returned set reads IMU + embeddings from the cache and never decodes video.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Any

import torch

from mmloader.cache import DEFAULT_SHARD_SIZE, CachedWindows, cache_windows
from mmloader.lru import LRU
from mmloader.windows.protocol import Windows, WrappedWindows, position

from .text import text_of

__all__ = ["EMBED_FORMAT", "REDUCES", "EmbeddedWindows", "build_embedding_cache", "text_of", "towers_fingerprint"]

EMBED_FORMAT = 1
REDUCES = ("center", "mean")
EMBEDDED_BLOCKS = 2  # blocks of embedded samples kept per process (the window cache reads a shard at a time)


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


class EmbeddedWindows(WrappedWindows):
    """``windows`` with frozen-tower embeddings instead of raw video (see the module docstring).

    Wraps ``windows`` (a ``WindowSet``, or a cached view of one, whose source is then used; it needs
    ``modalities``) and is itself a :class:`mmloader.windows.protocol.Windows`, so mmloader's window cache holds it
    like any other set. Its fingerprint components are the wrapped set's: the towers are identified by the cache's
    ``transforms`` (:func:`towers_fingerprint`, which ``cache()`` and :func:`build_embedding_cache` pass), as the
    keys of existing embedding caches were built.
    """

    def __init__(self, windows: Windows, towers: Any, reduce: str = "center", block_size: int = 32):
        if getattr(windows, "window_cache", None) is not None:
            windows = windows.window_cache.source
        if reduce not in REDUCES:
            raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
        self.windows = windows
        self.towers = towers
        self.reduce = reduce
        self.block_size = int(block_size)
        self._emb: LRU[list[dict[str, Any]]] = LRU(EMBEDDED_BLOCKS)
        self._emb_lock = threading.Lock()

    @property
    def source(self) -> Windows:
        """The set whose windows are embedded: its description and selections are this set's
        (``WrappedWindows``; a selection is raw windows, embed it again or cache it)."""
        return self.windows

    def will_read(self, indices: Any) -> None:
        """Forwarded to the wrapped set (decode plans for index-order reads), when it has the hook."""
        announce = getattr(self.windows, "will_read", None)
        if announce is not None:
            announce(indices)

    def loader(self, batch_size: int = 32, shuffle: bool = False, seed: int = 0, num_workers: int = 0, **kw: Any):
        """A ``mmloader.loader.WindowLoader`` over the embedded windows (the arguments of ``WindowSet.loader``)."""
        from mmloader.loader import WindowLoader

        return WindowLoader(self, batch_size=batch_size, shuffle=shuffle, seed=seed, num_workers=num_workers, **kw)

    @property
    def video_key(self) -> str | None:
        return self.modalities.video[0] if self.modalities.video else None

    # -- the Windows protocol --------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        b, j = divmod(position(i, len(self)), self.block_size)
        with self._emb_lock:
            block = self._emb.get(b, lambda: self._embed_block(b))
        return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in block[j].items()}

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def index_fields(self, i: int) -> dict[str, Any]:
        return self.windows.index_fields(i)

    def index_fields_batch(self, indices: Any) -> dict[str, Any]:
        """``collate`` of ``index_fields`` over ``indices`` (column by column when the wrapped set can)."""
        from mmloader.windows.collate import batch_index_fields

        return batch_index_fields(self.windows, indices)

    def fingerprint_components(self) -> dict[str, Any]:
        """The wrapped set's components (the towers and ``reduce`` go in the cache's ``transforms``)."""
        return self.windows.fingerprint_components()

    def raw(self, i: int) -> dict[str, Any]:
        """The source sample of window ``i`` (with its video), as the wrapped set gives it."""
        return self.windows[i]

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

    # -- fluent, pickling ------------------------------------------------------------------------
    def cache(self, url: str = "auto", fill: str = "lazy", progress: bool = True, *, transforms: str | None = None,
              shard_size: int | None = None, overwrite: bool = False, **storage_options: Any) -> CachedWindows:
        """This set read through mmloader's window cache (see ``mmloader.windows.dataset.WindowSet.cache``);
        ``transforms`` defaults to :func:`towers_fingerprint` of the towers and ``reduce``."""
        if transforms is None:
            transforms = towers_fingerprint(self.towers, self.reduce)
        return cache_windows(self, url, fill, progress, transforms=transforms, shard_size=shard_size,
                             overwrite=overwrite, **storage_options)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_emb"] = LRU(EMBEDDED_BLOCKS)
        del state["_emb_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._emb_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EmbeddedWindows({self.windows!r}, model={self.towers.model_name!r}, reduce={self.reduce!r})"


def build_embedding_cache(windows: Windows, towers: Any, url: str = "auto", reduce: str = "center",
                          fill: str = "eager", progress: bool = False, shard_size: int | None = None,
                          overwrite: bool = False, rank: int = 0, world_size: int = 1,
                          **storage_options: Any) -> CachedWindows:
    """A set serving ``EmbeddedWindows(windows, towers, reduce)`` from mmloader's window cache at ``url``.

    The cache key includes :func:`towers_fingerprint` (model, weights, preprocessing, ``reduce``), so other towers
    or another ``reduce`` never reuse these embeddings. ``fill="eager"`` (default) embeds every window now, so a
    training loop afterwards never decodes video; ``"lazy"`` embeds a shard the first time one of its windows is
    read. Publishing is atomic per shard (mmloader's cache writes then commits).

    ``rank``/``world_size``: with ``fill="eager"``, embed only this rank's contiguous part of the shards
    (``mmloader.loader.fill_cache``): ranks together build the same cache as one process; the other ranks' shards
    are read (and embedded on a miss) lazily.
    """
    from mmloader.loader import fill_cache

    if fill not in ("lazy", "eager"):
        raise ValueError(f"fill must be 'lazy' or 'eager', got {fill!r}")
    shard = shard_size or DEFAULT_SHARD_SIZE
    src = EmbeddedWindows(windows, towers, reduce=reduce, block_size=shard)
    cached = src.cache(url, fill="lazy", progress=progress, transforms=towers_fingerprint(towers, reduce),
                       shard_size=shard, overwrite=overwrite, **storage_options)
    if fill == "eager":
        fill_cache(cached, num_workers=0, progress=progress, rank=rank, world_size=world_size)
    return cached
