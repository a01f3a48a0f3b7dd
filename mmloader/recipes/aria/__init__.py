"""The Project Aria recipe: VRS recordings (IMU, RGB camera, speech, MPS) → a store."""

from .recipe import AriaAdapter

__all__ = ["AriaAdapter"]
