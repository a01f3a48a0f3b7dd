"""Frozen open_clip text and vision towers: narrations and video frames → L2-normalised CLIP embeddings.

``ClipTowers("ViT-B-32", pretrained="openai")`` downloads weights through open_clip when online;
``ClipTowers("ViT-B-32-quickgelu", checkpoint="ViT-B-32.pt")`` loads a local file with open_clip's own loader;
``ClipTowers("imu2clip-tiny")`` builds a tiny, randomly initialised CLIP (registered with open_clip by this module)
for tests and the offline demo. Every parameter is frozen and the model stays in eval mode.

Frames are preprocessed as CLIP's own eval transform does (resize the shorter side with the model's interpolation,
centre crop to the model's image size, /255, the model's mean/std), but on uint8 tensors, batched, on the
towers' device, instead of PIL image by image.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import tempfile
import threading
import urllib.parse
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

TINY_MODEL = "imu2clip-tiny"
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
"""A ~3.4 M-parameter CLIP (3.2 M of it the real tokenizer's 49408-token embedding) for tests and demos."""

HF_HOST = "huggingface.co"
_OFFLINE_VALUES = {"1", "true", "yes", "on"}
_registry_lock = threading.Lock()
_registry_dir: Path | None = None


class WeightsUnavailableError(RuntimeError):
    """Pretrained CLIP weights were asked for and cannot be had (offline, unknown tag, or missing file)."""


def register_model_config(name: str, config: dict[str, Any]) -> str:
    """Register an open_clip model config under ``name`` (idempotent); returns ``name``.

    Uses open_clip's documented mechanism, ``open_clip.add_model_config(path)``: the config is written as
    ``<name>.json`` into a directory private to this process, which open_clip then scans.
    """
    import open_clip

    global _registry_dir
    if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(config):
        raise ValueError(f"an open_clip model config needs embed_dim, vision_cfg and text_cfg; got {sorted(config)}")
    with _registry_lock:
        if open_clip.get_model_config(name) == config:
            return name
        if _registry_dir is None:
            _registry_dir = Path(tempfile.mkdtemp(prefix="imu2clip_open_clip_configs_"))
        path = _registry_dir / f"{name}.json"
        path.write_text(json.dumps(config, indent=2))
        open_clip.add_model_config(path)
    return name


def register_tiny_config() -> str:
    """Register :data:`TINY_CONFIG` as ``imu2clip-tiny`` with open_clip; returns the name."""
    return register_model_config(TINY_MODEL, TINY_CONFIG)


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _OFFLINE_VALUES for v in ("HF_HUB_OFFLINE", "IMU2CLIP_OFFLINE"))


def _reachable(host: str, timeout: float) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_weights(tag_cfg: dict[str, Any], cache_dir: str | None) -> str | None:
    """The local file open_clip would load for a pretrained tag, if it is already on disk (no network)."""
    if tag_cfg.get("file") and os.path.isfile(tag_cfg["file"]):
        return tag_cfg["file"]
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - open_clip depends on huggingface_hub
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, filename = os.path.split(hub)
            names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            if filename.endswith((".bin", ".pth")):
                names.insert(0, filename[:-4] + ".safetensors")
            for fn in names:
                hit = try_to_load_from_cache(repo, fn, cache_dir=cache_dir)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return hit
    url = tag_cfg.get("url", "")
    if url:
        local = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(local):
            return local
    return None


class ClipTowers(nn.Module):
    """Frozen open_clip towers.

    Args:
        model_name: an open_clip architecture (``"ViT-B-32"``, ``"ViT-B-32-quickgelu"``, ``"imu2clip-tiny"``...).
        pretrained: an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b79k"``...): used from the local
            cache if there, else downloaded through open_clip when online. Also sets the tag's preprocessing and
            QuickGELU setting. None: random init (unless ``checkpoint``).
        checkpoint: a local weights file (``.pt``/``.bin``/``.safetensors``, an open_clip or OpenAI state dict)
            loaded with ``open_clip.load_checkpoint`` (strict). With ``pretrained`` too, the file supplies the
            weights and the tag only its metadata (nothing is downloaded).
        device: where the towers live and compute.
        cache_dir: open_clip / Hugging Face download cache (default: theirs).
        probe_timeout: seconds to wait for the download host before declaring it unreachable.

    Raises:
        WeightsUnavailableError: weights asked for and not obtainable (unknown tag, offline / unreachable host
            and not cached, download failure, missing checkpoint file). Offline is ``HF_HUB_OFFLINE=1`` (or
            ``IMU2CLIP_OFFLINE=1``) or the host not answering within ``probe_timeout``.
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None, checkpoint: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", cache_dir: str | None = None, probe_timeout: float = 3.0):
        super().__init__()
        import open_clip

        if model_name == TINY_MODEL:
            register_tiny_config()
        if open_clip.get_model_config(model_name) is None:
            raise ValueError(f"unknown open_clip model {model_name!r}; known: {open_clip.list_models()}")
        self.model_name = model_name
        self.pretrained = pretrained
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        kw: dict[str, Any] = {"device": device, "cache_dir": cache_dir}

        tag_cfg: dict[str, Any] = {}
        if pretrained is not None:
            tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
            if not tag_cfg:
                raise WeightsUnavailableError(
                    f"open_clip has no pretrained tag {pretrained!r} for model {model_name!r}; known tags: "
                    f"{open_clip.list_pretrained_tags_by_model(model_name) or 'none'}")
            kw["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
            kw["force_preprocess_cfg"] = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode")
                                          if k in tag_cfg}

        if self.checkpoint is not None:
            if not os.path.isfile(self.checkpoint):
                raise WeightsUnavailableError(
                    f"checkpoint file for CLIP model {model_name!r} not found: {self.checkpoint}")
            model = open_clip.create_model(model_name, pretrained=None, **kw)
            try:  # weights_only: a file a user was handed never runs pickled code
                open_clip.load_checkpoint(model, self.checkpoint, strict=True, weights_only=True)
            except pickle.UnpicklingError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise WeightsUnavailableError(
                    f"{self.checkpoint}: refusing to load CLIP weights for {model_name!r}: the file holds more than "
                    f"tensors and plain values (torch.load weights_only=True): {first}") from None
        elif pretrained is not None:
            local = _cached_weights(tag_cfg, cache_dir)
            if local is not None:
                model = open_clip.create_model(model_name, pretrained=local, **kw)
            else:
                url = tag_cfg.get("url", "")
                host = HF_HOST if tag_cfg.get("hf_hub") else (urllib.parse.urlparse(url).hostname or HF_HOST)
                why = ("offline (HF_HUB_OFFLINE/IMU2CLIP_OFFLINE is set)" if _offline()
                       else None if _reachable(host, probe_timeout)
                       else f"{host} is unreachable (no network within {probe_timeout:g} s)")
                if why is not None:
                    raise WeightsUnavailableError(self._unavailable(why))
                try:
                    model = open_clip.create_model(model_name, pretrained=pretrained, **kw)
                except Exception as e:  # open_clip raises RuntimeError with the hub's message
                    raise WeightsUnavailableError(self._unavailable(f"the download failed: {e}")) from e
        else:
            model = open_clip.create_model(model_name, pretrained=None, **kw)

        model.requires_grad_(False)
        model.eval()
        self.model = model
        self.tokenizer = open_clip.get_tokenizer(model_name)
        pp = open_clip.get_model_preprocess_cfg(model)
        size = pp.get("size", 224)
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.resize_mode: str = pp.get("resize_mode", "shortest")
        self.interpolation = InterpolationMode.BILINEAR if pp.get("interpolation") == "bilinear" else InterpolationMode.BICUBIC
        self.fill_color: int = int(pp.get("fill_color", 0))
        self.register_buffer("mean", torch.tensor(pp["mean"], dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pp["std"], dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.to(device)

    def _unavailable(self, why: str) -> str:
        return (f"cannot load pretrained weights {self.pretrained!r} for CLIP model {self.model_name!r}: {why}; "
                "the weights cannot be downloaded here. Run once online to fill the cache, or pass "
                "checkpoint=<local weights file>, or use pretrained=None (random init, e.g. 'imu2clip-tiny').")

    # -- frozen ---------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "ClipTowers":
        """The towers are frozen: always eval mode, whatever ``mode`` says."""
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        """Size D of the joint CLIP embedding."""
        import open_clip

        return int(open_clip.get_model_config(self.model_name)["embed_dim"])

    @property
    def device(self) -> torch.device:
        return self.mean.device

    # -- text ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, texts: Sequence[str] | str) -> Tensor:
        """Narrations → ``(B, D)`` float32, L2-normalised (tokenised with the model's own tokenizer)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.embed_dim, device=self.device)
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float()

    # -- frames --------------------------------------------------------------------------------
    def preprocess(self, frames: Tensor) -> Tensor:
        """CLIP's eval preprocessing on a batch: uint8 ``(N, 3, H, W)`` → float32 ``(N, 3, S, S)`` (mean/std applied).

        ``shortest`` (CLIP's default): resize so the image covers the target (shorter side = S) with the
        model's interpolation (antialiased), then centre crop. ``squash``: resize to the target. ``longest``:
        resize the longer side to S, then pad (``fill_color``) to the target, centred.
        """
        if frames.ndim != 4 or frames.shape[1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"expected uint8 frames (N, 3, H, W), got {frames.dtype} {tuple(frames.shape)}")
        frames = frames.to(self.device)
        th, tw = self.image_size
        h, w = frames.shape[-2:]
        interp = {"interpolation": self.interpolation, "antialias": True}
        if self.resize_mode == "squash":
            x = TF.resize(frames, [th, tw], **interp)
        elif self.resize_mode == "longest":
            scale = min(th / h, tw / w)
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            x = TF.resize(frames, [nh, nw], **interp)
            top, left = (th - nh) // 2, (tw - nw) // 2
            x = TF.pad(x, [left, top, tw - nw - left, th - nh - top], fill=self.fill_color)
        else:
            if th == tw:
                x = TF.resize(frames, th, **interp)  # shorter side → S, as torchvision's Resize(S)
            else:
                scale = max(th / h, tw / w)
                x = TF.resize(frames, [max(th, round(h * scale)), max(tw, round(w * scale))], **interp)
            x = TF.center_crop(x, [th, tw])
        x = x.float().div_(255.0)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode_images(self, frames: Tensor) -> Tensor:
        """uint8 frames ``(N, 3, H, W)`` → ``(N, D)`` float32, L2-normalised."""
        return self.model.encode_image(self.preprocess(frames), normalize=True).float()

    @torch.no_grad()
    def encode_frames(self, video: Tensor, reduce: str = "center") -> Tensor:
        """Video windows → one L2-normalised embedding per window.

        Args:
            video: uint8 ``(B, F, 3, H, W)`` (the loader's ``batch["video"]``) or ``(B, 3, H, W)`` (one frame each).
            reduce: ``"center"``: embed frame ``F // 2`` of each window; ``"mean"``: embed all F frames, average
                the normalised embeddings and normalise again.

        Returns:
            ``(B, D)`` float32 on the towers' device.
        """
        if video.ndim == 4:
            video = video.unsqueeze(1)
        if video.ndim != 5:
            raise ValueError(f"expected video (B, F, 3, H, W), got {tuple(video.shape)}")
        B, F = video.shape[:2]
        if reduce == "center":
            return self.encode_images(video[:, F // 2])
        if reduce == "mean":
            z = self.encode_images(video.reshape(B * F, *video.shape[2:])).view(B, F, -1)
            return nn.functional.normalize(z.mean(1), dim=-1)
        raise ValueError(f"reduce must be 'center' or 'mean', got {reduce!r}")

    def extra_repr(self) -> str:
        return (f"model_name={self.model_name!r}, pretrained={self.pretrained!r}, checkpoint={self.checkpoint!r}, "
                f"image_size={self.image_size}, embed_dim={self.embed_dim}")
