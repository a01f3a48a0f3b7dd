"""The Ego4D recipe: ego4d.json metadata, full-scale mp4s, IMU CSVs and narrations → a store."""

from .recipe import Ego4DAdapter

__all__ = ["Ego4DAdapter"]
