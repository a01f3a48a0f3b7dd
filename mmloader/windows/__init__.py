"""Windows: fixed-length, timestamp-aligned slices of a store's recordings.

``spec`` (what a window is, argument checks), ``index`` (candidates and drop rules), ``dataset`` (``WindowSet``,
the map-style torch dataset), ``resample`` (time series onto the window grid), ``collate`` (samples → batch).
``WindowSet`` and ``collate`` import torch, so they load on first use: ``import mmloader.windows`` stays light.
"""

from .index import build_index
from .protocol import Windows
from .spec import (MAX_FRAME_REFS, MAX_FRAME_SIDE, MAX_FRAMES_PER_WINDOW, MAX_IMU_HZ, MAX_SAMPLES_PER_WINDOW, MAX_SEC,
                   MAX_WINDOWS, NS, VIDEO_BACKENDS, Modalities, WindowSpec, check_split, frames_held, resolve_modalities)

__all__ = ["MAX_FRAME_REFS", "MAX_FRAME_SIDE", "MAX_FRAMES_PER_WINDOW", "MAX_IMU_HZ", "MAX_SAMPLES_PER_WINDOW",
           "MAX_SEC", "MAX_WINDOWS", "NS", "VIDEO_BACKENDS", "Modalities", "WindowSet", "WindowSpec", "Windows", "build_index",
           "check_split", "collate", "frames_held", "resolve_modalities"]


def __getattr__(name: str):
    if name == "WindowSet":
        from .dataset import WindowSet

        return WindowSet
    if name == "collate":
        from .collate import collate

        return collate
    raise AttributeError(f"module 'mmloader.windows' has no attribute {name!r}")
