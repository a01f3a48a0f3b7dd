"""Constants of the sample that its readers (tests, docs, the manifest) rely on."""

from __future__ import annotations

import math

__all__ = ["ACTIVITIES", "DEFECT_KINDS", "GRAVITY", "IMU_HEADER", "IMU_RATE_HZ", "MANIFEST_NAME", "MANIFEST_VERSION",
           "TAU"]

ACTIVITIES: tuple[str, ...] = (
    "walking",
    "running",
    "sitting down",
    "standing up",
    "looking around",
    "cycling",
    "climbing stairs",
)
IMU_HEADER = (
    "component_idx,component_timestamp_ms,canonical_timestamp_ms,gyro_x,gyro_y,gyro_z,accl_x,accl_y,accl_z"
)
DEFECT_KINDS: tuple[str, ...] = (
    "missing_timestamps",  # canonical_timestamp_ms empty or the literal NULL
    "missing_accl",  # accl_x/y/z all empty, or one of them empty
    "non_monotonic",  # adjacent blocks of rows swapped
    "duplicate_timestamps",  # exact duplicate rows + rows sharing a timestamp with other values
    "time_outliers",  # canonical_timestamp_ms of +-1e12-ish
    "multi_component_gap",  # 1-3 s without samples, then component_idx + 1 with a fresh clock offset
)
MANIFEST_NAME = "sample_manifest.json"
MANIFEST_VERSION = 1

GRAVITY = 9.81  # m/s^2
IMU_RATE_HZ = 200.0  # nominal
TAU = 2.0 * math.pi
