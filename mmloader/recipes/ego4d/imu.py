"""Reading and repairing Ego4D IMU CSVs (``v2/imu/<video_uid>.csv``).

Clock: ``canonical_timestamp_ms`` is the canonical video time in milliseconds; the result is int64 ns on
that clock. Channels are returned as ``[accl_x, accl_y, accl_z, gyro_x, gyro_y, gyro_z]``.

Documented defects of the native files, and what is done about each (every action is counted):

=========================  ==========================================================================
defect                     action
=========================  ==========================================================================
empty / NULL canonical ts  recovered from ``component_timestamp_ms`` + the component's clock offset
                           (median over its good rows); dropped when that is impossible
empty sensor values        row dropped (``missing_values``)
absurd timestamps          row dropped (``timestamp_outlier``): outside the video ± 1 s, or 1e12 ms
absurd sensor values       row dropped (``value_outlier``): non-finite or beyond physical bounds
non-monotonic rows         sorted by time (``reordered`` counts rows that were out of order)
duplicated timestamps      first row kept (``duplicate_timestamp``)
components with gaps       kept as they are; each gap (> ``gap_factor`` × median period) is reported
                           and stored in ``gaps.parquet`` so windows mask it, never fill it
=========================  ==========================================================================
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ...errors import SourceFormatError
from ...fsutil import read_arrow_buffer
from ..imu import CHANNELS, NS, UNITS, ImuSeries, find_gaps, median_period_ns, sort_dedupe

HEADER = [
    "component_idx",
    "component_timestamp_ms",
    "canonical_timestamp_ms",
    "gyro_x",
    "gyro_y",
    "gyro_z",
    "accl_x",
    "accl_y",
    "accl_z",
]
NULL_VALUES = ["", "NULL", "null", "Null", "NaN", "nan", "None", "none"]
MAX_ACCEL = 2000.0  # m/s^2 (~200 g): beyond it a reading is not physical
MAX_GYRO = 200.0  # rad/s
TIME_MARGIN_MS = 1000.0

CleanIMU = ImuSeries  # a repaired IMU stream (canonical clock) and the account of what was done to it


def read_imu_csv(path: str, duration_sec: float | None = None, gap_factor: float = 5.0) -> ImuSeries:
    """Read, check and repair one Ego4D IMU CSV.

    ``duration_sec`` (from ego4d.json) bounds plausible timestamps. Raises SourceFormatError naming the
    file when the header is not exactly ``HEADER`` or a field cannot be parsed as a number.
    """
    buf = read_arrow_buffer(path)
    first = buf.slice(0, min(4096, buf.size)).to_pybytes().split(b"\n", 1)[0].decode("utf-8", "replace").strip().lstrip("\ufeff")
    found = [c.strip() for c in first.split(",")]
    if found != HEADER:
        missing = [c for c in HEADER if c not in found]
        extra = [c for c in found if c not in HEADER]
        detail = f"header {first!r}"
        if missing or extra:
            detail += f"; missing {missing}, unexpected {extra}"
        raise SourceFormatError(path, detail, "the header " + ",".join(HEADER))
    try:
        table = pacsv.read_csv(
            pa.BufferReader(buf),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.float64() for c in HEADER}, null_values=NULL_VALUES, strings_can_be_null=True
            ),
        )
    except pa.ArrowInvalid as e:
        m = re.search(r"column #(\d+)", str(e))
        col = f" field '{HEADER[int(m.group(1))]}'" if m and int(m.group(1)) < len(HEADER) else ""
        raise SourceFormatError(path, f"cannot parse{col} ({e})", "numbers in every field") from None
    cols = {c: table.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in HEADER}
    return clean_imu_columns(cols, duration_sec=duration_sec, gap_factor=gap_factor)


def clean_imu_columns(
    cols: dict[str, np.ndarray], duration_sec: float | None = None, gap_factor: float = 5.0
) -> ImuSeries:
    """Repair parsed CSV columns (float64, NaN for nulls); see the module table for the rules."""
    n_read = len(cols["canonical_timestamp_ms"])
    dropped: dict[str, int] = {}
    fixed: dict[str, int] = {}
    t_ms = cols["canonical_timestamp_ms"].copy()
    comp = cols["component_idx"]
    comp_ts = cols["component_timestamp_ms"]
    values = np.stack([cols[c] for c in CHANNELS], axis=1)

    hi = (duration_sec * 1000.0 + TIME_MARGIN_MS) if duration_sec else np.inf
    plausible = lambda t: np.isfinite(t) & (t >= -TIME_MARGIN_MS) & (t <= hi) & (np.abs(t) < 1e11)  # noqa: E731

    present = np.isfinite(t_ms)
    outlier = present & ~plausible(t_ms)
    t_ms[outlier] = np.nan
    # Recover missing canonical times through the component clock offset.
    missing_t = ~np.isfinite(t_ms)
    recovered = np.zeros(n_read, dtype=bool)
    offsets: dict[float, float] = {}
    for c in np.unique(comp[np.isfinite(comp)]):
        good = (comp == c) & np.isfinite(t_ms) & np.isfinite(comp_ts)
        if good.sum() >= 2:
            offsets[float(c)] = float(np.median(t_ms[good] - comp_ts[good]))
    for c, off in offsets.items():
        fix = missing_t & (comp == c) & np.isfinite(comp_ts)
        cand = comp_ts[fix] + off
        ok = plausible(cand)
        idx = np.flatnonzero(fix)[ok]
        t_ms[idx] = cand[ok]
        recovered[idx] = True
    still_missing = ~np.isfinite(t_ms)
    _count(dropped, "timestamp_outlier", int((outlier & still_missing).sum()))
    _count(dropped, "missing_timestamp", int((~present & still_missing).sum()))
    _count(fixed, "timestamp_recovered", int(recovered.sum()))
    keep = ~still_missing

    missing_values = keep & ~np.all(np.isfinite(values), axis=1) & np.any(np.isnan(values), axis=1)
    _count(dropped, "missing_values", int(missing_values.sum()))
    keep &= ~missing_values
    bounds = np.array([MAX_ACCEL] * 3 + [MAX_GYRO] * 3)
    absurd = keep & ~np.all(np.isfinite(values) & (np.abs(values) <= bounds), axis=1)
    _count(dropped, "value_outlier", int(absurd.sum()))
    keep &= ~absurd

    t_ms, values, comp_kept = t_ms[keep], values[keep], comp[keep]
    rows = sort_dedupe(np.round(t_ms * 1e6).astype(np.int64), values, comp_kept, t_read=t_ms)
    _count(fixed, "reordered", rows.reordered)
    _count(dropped, "duplicate_timestamp", rows.duplicates)
    t_ns, (values, comp_kept) = rows.t_ns, rows.columns

    gaps: list[tuple[int, int]] = []
    rate_hz = 0.0
    if t_ns.size > 1:
        period = median_period_ns(t_ns)
        rate_hz = NS / period
        gaps = find_gaps(t_ns, gap_factor, period)
    report = {
        "rows_read": n_read,
        "rows_kept": int(t_ns.size),
        "dropped": dropped,
        "fixed": fixed,
        "components": sorted(int(c) for c in np.unique(comp_kept[np.isfinite(comp_kept)])),
        "gaps_sec": [[a / 1e9, b / 1e9] for a, b in gaps],
        "measured_rate_hz": round(rate_hz, 3),
    }
    return ImuSeries(t_ns=t_ns, data=values.astype(np.float32), gaps=gaps, report=report)


def _count(d: dict[str, int], key: str, n: int) -> None:
    if n:
        d[key] = d.get(key, 0) + n


__all__ = ["CHANNELS", "HEADER", "UNITS", "CleanIMU", "clean_imu_columns", "read_imu_csv"]
