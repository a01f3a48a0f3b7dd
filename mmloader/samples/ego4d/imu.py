"""The IMU CSV: sensor readings sampled from the head track, planned gaps (new components), row defects
(see ``DEFECT_KINDS``) and the CSV text."""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import numpy as np

from .constants import DEFECT_KINDS, IMU_HEADER, IMU_RATE_HZ
from .motion import HeadTrack

__all__ = ["write_imu_csv"]


def _sample_times(duration: float, rng: np.random.Generator) -> np.ndarray:
    """IMU sample times (s, canonical): ~200 Hz with a slightly off clock rate and ±0.3 ms jitter,
    starting up to 0.5 s after the first frame and ending up to 0.5 s before the video end."""
    t0 = float(rng.uniform(0.02, 0.5))
    t1 = duration - float(rng.uniform(0.02, 0.5))
    period = 1.0 / (IMU_RATE_HZ * (1.0 + float(rng.uniform(-2e-4, 2e-4))))
    n = int((t1 - t0) / period) + 1
    return t0 + np.arange(n) * period + rng.uniform(-3e-4, 3e-4, n)


def _sensor_readings(head: HeadTrack, t: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(gyro rad/s, accl m/s^2) at times ``t``: the head track + white noise; gyro also gets a bias
    that drifts as a random walk."""
    gyro = np.stack([np.interp(t, head.t, head.gyro[:, k]) for k in range(3)], axis=1)
    accl = np.stack([np.interp(t, head.t, head.accl[:, k]) for k in range(3)], axis=1)
    bias = rng.normal(0.0, 0.01, 3) + np.cumsum(rng.normal(0.0, 4e-5, (t.size, 3)), axis=0)
    gyro = gyro + bias + rng.normal(0.0, 0.01, gyro.shape)
    accl = accl + rng.normal(0.0, 0.04, accl.shape)
    return gyro, accl


def _plan_gaps(duration: float, t: np.ndarray, rng: np.random.Generator) -> list[tuple[float, float]]:
    """1 gap (2 when the video is >= 30 s) of 1-3 s without samples, returned as the planned
    (start, end) in seconds."""
    n = 1 if duration < 30.0 else 2
    span = t[-1] - t[0]
    out = []
    for k in range(n):
        centre = t[0] + span * (k + 1) / (n + 1) + float(rng.uniform(-0.05, 0.05)) * span
        length = float(rng.uniform(1.0, 3.0))
        out.append((centre - length / 2, centre + length / 2))
    return out


def _format_rows(t: np.ndarray, gyro: np.ndarray, accl: np.ndarray, component: np.ndarray,
                 offsets_ms: Sequence[int]) -> list[list[str]]:
    """CSV fields as strings: times to 3 decimals (ms), sensor values to 6 decimals."""
    canon = np.round(t * 1000.0, 3)
    comp_ts = canon + np.asarray(offsets_ms, dtype=np.float64)[component]
    cols = [
        [str(int(c)) for c in component],
        [f"{x:.3f}" for x in comp_ts],
        [f"{x:.3f}" for x in canon],
        *([f"{x:.6f}" for x in gyro[:, k]] for k in range(3)),
        *([f"{x:.6f}" for x in accl[:, k]] for k in range(3)),
    ]
    return [list(r) for r in zip(*cols)]


def _inject_row_defects(rows: list[list[str]], rng: np.random.Generator) -> dict[str, int]:
    """Damage rows in place (see ``DEFECT_KINDS``) and return how many rows got each encoding."""
    counts = {"empty_timestamp": 4, "null_timestamp": 4, "empty_accl_all": 4, "empty_accl_one": 3,
              "time_outlier": 3, "exact_duplicate": 4, "conflicting_duplicate": 3}
    chosen = rng.choice(np.arange(20, len(rows) - 20), size=sum(counts.values()), replace=False)
    picks: dict[str, list[int]] = {}
    at = 0
    for name, n in counts.items():
        picks[name] = sorted(int(i) for i in chosen[at:at + n])
        at += n
    for i in picks["empty_timestamp"]:
        rows[i][2] = ""
    for i in picks["null_timestamp"]:
        rows[i][2] = "NULL"
    for i in picks["empty_accl_all"]:
        rows[i][6:9] = ["", "", ""]
    for i in picks["empty_accl_one"]:
        rows[i][6 + int(rng.integers(3))] = ""
    for i in picks["time_outlier"]:
        rows[i][2] = f"{float(rng.choice([1.0e12, -1.0e12, 9.999e12, -5.0e11])) + float(rng.uniform(0, 1e3)):.3f}"
    inserts = [(i, list(rows[i])) for i in picks["exact_duplicate"]]
    for i in picks["conflicting_duplicate"]:
        other = list(rows[i])
        other[3:9] = [f"{float(v) + float(rng.normal(0, 0.5)):.6f}" for v in other[3:9]]
        inserts.append((i, other))
    for i, row in sorted(inserts, key=lambda x: x[0], reverse=True):
        rows.insert(i + 1, row)
    counts["swapped_blocks"] = _swap_blocks(rows, rng, 3)
    return counts


def _swap_blocks(rows: list[list[str]], rng: np.random.Generator, n_blocks: int) -> int:
    """Swap ``n_blocks`` pairs of adjacent blocks (4-12 rows each), one pair per region of the file."""
    region = len(rows) // n_blocks
    for k in range(n_blocks):
        size = int(rng.integers(4, 13))
        start = k * region + int(rng.integers(10, region - 2 * size - 10))
        a, b = rows[start:start + size], rows[start + size:start + 2 * size]
        rows[start:start + 2 * size] = b + a
    return n_blocks


def write_imu_csv(path: pathlib.Path, head: HeadTrack, duration: float, defective: bool,
                  rng: np.random.Generator, defect_rng: np.random.Generator) -> dict[str, Any]:
    """Sample, (maybe) damage and write one IMU CSV; return its manifest facts (times in s)."""
    t = _sample_times(duration, rng)
    gyro, accl = _sensor_readings(head, t, rng)
    component = np.zeros(t.size, dtype=np.int64)
    offsets = [int(rng.integers(1_600_000_000_000, 1_650_000_000_000))]
    gaps: list[list[float]] = []
    if defective:
        keep = np.ones(t.size, dtype=bool)
        for a, b in _plan_gaps(duration, t, defect_rng):
            inside = (t > a) & (t < b)
            keep &= ~inside
            component[t >= b] += 1
            offsets.append(int(defect_rng.integers(1_000_000, 9_000_000)))
        t, gyro, accl, component = t[keep], gyro[keep], accl[keep], component[keep]
        gaps = [[_csv_sec(t[j]), _csv_sec(t[j + 1])] for j in np.flatnonzero(np.diff(component))]
    rows = _format_rows(t, gyro, accl, component, offsets)
    defect_rows = _inject_row_defects(rows, defect_rng) if defective else {}
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(IMU_HEADER + "\n")
        f.writelines(",".join(r) + "\n" for r in rows)
    components = []
    for c in range(int(component.max()) + 1):
        tc = t[component == c]
        components.append({"component_idx": c, "offset_ms": offsets[c], "start_sec": _csv_sec(tc[0]),
                           "end_sec": _csv_sec(tc[-1]), "samples": int(tc.size)})
    return {"defects": list(DEFECT_KINDS) if defective else [], "defect_rows": defect_rows, "gaps_sec": gaps,
            "components": components, "imu_start_sec": _csv_sec(t[0]), "imu_end_sec": _csv_sec(t[-1]),
            "rows": len(rows)}


def _csv_sec(t: float) -> float:
    """A sample time (s) exactly as the CSV writes it (ms to 3 decimals), back in seconds."""
    return round(float(f"{np.round(float(t) * 1000.0, 3):.3f}") / 1000.0, 6)
