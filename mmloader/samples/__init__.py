"""Small synthetic datasets written in their native on-disk layouts (for demos and tests)."""

from .ego4d import ACTIVITIES, generate_ego4d_sample, load_sample_manifest, sample_defects

__all__ = ["ACTIVITIES", "generate_ego4d_sample", "load_sample_manifest", "sample_defects"]
