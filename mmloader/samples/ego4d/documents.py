"""The JSON documents: ego4d.json (metadata), sample_manifest.json, and the deterministic JSON writer."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

from .constants import ACTIVITIES, DEFECT_KINDS, IMU_RATE_HZ, MANIFEST_VERSION
from .plan import VideoPlan

__all__ = ["manifest_doc", "manifest_entry", "metadata_doc", "write_json"]

_SCENARIOS = {
    "walking": "Indoor Navigation (walking)",
    "running": "Cycling / jogging",
    "sitting down": "Working at desk",
    "standing up": "Household management",
    "looking around": "Hanging out with friends",
    "cycling": "Cycling / jogging",
    "climbing stairs": "Indoor Navigation (walking)",
}


def metadata_doc(plans: Sequence[VideoPlan], duration: float, num_frames: int, fps: float,
                 size: tuple[int, int]) -> dict[str, Any]:
    """ego4d.json."""
    width, height = size
    videos = []
    for p in plans:
        videos.append({
            "video_uid": p.video_uid,
            "duration_sec": duration,
            "scenarios": sorted({_SCENARIOS[s.activity] for s in p.segments}),
            "device": p.device,
            "physical_setting_name": p.physical_setting,
            "has_imu": p.has_imu,
            "has_gaze": False,
            "split_em": None,
            "split_av": None,
            "split_fho": p.split,
            "video_metadata": {
                "fps": fps, "num_frames": num_frames, "video_codec": "h264",
                "display_resolution_width": width, "display_resolution_height": height,
                "sample_resolution_width": width, "sample_resolution_height": height,
                "mp4_duration_sec": duration, "video_start_sec": 0.0, "video_duration_sec": duration,
                "audio_codec": None,
            },
        })
    return {"version": "v2", "description": "A synthetic mmloader sample in the Ego4D v2 layout (not real Ego4D data)",
            "date": "2022-01-01", "videos": videos, "clips": []}


def manifest_doc(videos: list[dict[str, Any]], arguments: dict[str, Any]) -> dict[str, Any]:
    """sample_manifest.json (sample-only: what was generated and which defects were injected where)."""
    return {
        "generator": "mmloader.samples.ego4d",
        "manifest_version": MANIFEST_VERSION,
        "arguments": arguments,
        "activities": list(ACTIVITIES),
        "defect_kinds": list(DEFECT_KINDS),
        "imu": {"rate_hz": IMU_RATE_HZ, "frame": "x right, y down, z forward (head-fixed)",
                "accl": "m/s^2, linear acceleration + gravity (+9.81 on the down axis when still and level)",
                "gyro": "rad/s, body angular velocity", "clock": "canonical_timestamp_ms = video time in ms"},
        "videos": videos,
    }


def manifest_entry(plan: VideoPlan, imu_info: dict[str, Any]) -> dict[str, Any]:
    """One video of sample_manifest.json."""
    return {
        "video_uid": plan.video_uid,
        "split": plan.split,
        "has_imu": plan.has_imu,
        "has_narrations": bool(plan.narration_passes),
        "narration_passes": list(plan.narration_passes),
        "defects": imu_info.get("defects", []),
        "defect_rows": imu_info.get("defect_rows", {}),
        "gaps_sec": imu_info.get("gaps_sec", []),
        "components": imu_info.get("components", []),
        "imu_start_sec": imu_info.get("imu_start_sec"),
        "imu_end_sec": imu_info.get("imu_end_sec"),
        "imu_rows": imu_info.get("rows", 0),
        "activities": [s.as_dict() for s in plan.segments],
    }


def write_json(path: pathlib.Path, obj: Any) -> None:
    """Deterministic JSON (2-space indent, key order as built, trailing newline)."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
