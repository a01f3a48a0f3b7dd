"""IMU2CLIP on top of mmloader: an IMU encoder trained against frozen CLIP towers.

The encoder, towers, embedding cache, trainer (``from imu2clip_plugin.train import TrainConfig, Trainer, train``) and
evaluation (``from imu2clip_plugin.evaluate import evaluate_encoder``), and the motion index searched by text, image
or moment (``from imu2clip_plugin import MotionIndex, build_index``). This package depends on mmloader, never the
reverse.

``encoder`` and ``loss`` need only torch (``safetensors`` to save/load); ``towers`` needs ``open_clip_torch`` and
``torchvision`` and is imported on first use of its names.
"""

from typing import Any

from .encoder import IMUEncoder, IMUEncoderConfig, load_encoder, save_encoder
from .loss import ContrastiveLoss, gather_with_grad, info_nce

__version__ = "0.1.0"

_LAZY = {"TrainConfig": "train", "Trainer": "train", "EmbeddedWindows": "embed", "build_embedding_cache": "embed",
         "towers_fingerprint": "embed", "MotionIndex": "motion_index", "build_index": "motion_index"}

_TOWERS = ("ClipTowers", "WeightsUnavailableError", "TINY_MODEL", "TINY_CONFIG", "register_tiny_config",
           "register_model_config")

__all__ = ["IMUEncoder", "IMUEncoderConfig", "save_encoder", "load_encoder",
           "ContrastiveLoss", "info_nce", "gather_with_grad", *_TOWERS, *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _TOWERS:
        from . import towers

        return getattr(towers, name)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'imu2clip_plugin' has no attribute {name!r}")
