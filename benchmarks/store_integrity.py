"""Cost of the store's integrity checks on realistic reads. Prints JSON.

    python benchmarks/store_integrity.py [--minutes 10 --hz 200 --channels 6 --window 2 --recordings 1000 --repeat 3]

Uses only the public API (StoreWriter, Store), so the same script times an older mmloader for a before/after
comparison, e.g. the last commit without the checks:

    git archive HEAD mmloader schemas | tar -x -C /tmp/base && cp -r /tmp/base/schemas /tmp/base/mmloader/schemas
    PYTHONPATH=/tmp/base python benchmarks/store_integrity.py

Cases (each the best of ``--repeat`` runs, every run on a freshly opened Store: nothing cached):
- ``imu_windows``: one ``--minutes`` long IMU series (``--hz``, ``--channels``), read window by window
  (``--window`` seconds, no overlap) with ``timeseries_slice``, the loader's path (chunk LRU, cached handle);
- ``imu_whole``: ``read_timeseries`` of that series;
- ``many_recordings``: ``--recordings`` recordings of 10 s each, one window read from each (a handle opened per
  recording: group open, generation, chunk listing);
- ``open``: ``Store(url)`` of the many-recordings store (reads and hashes its three tables);
- ``validate``: ``Store.validate()`` of each store (older versions compare sizes only; this one decodes
  every chunk and hashes every other file).

``--smoke``: a few seconds of data and a handful of recordings, one run each (checks that it works).
Output keys: mmloader, mmloader_path, machine, args, write_long_s, write_many_s, imu_windows, imu_whole,
many_recordings, open, validate_long_s, validate_many_s, store_bytes_many.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

import mmloader
from common import Timer, best, emit, machine, parse_args, parser, workdir
from mmloader import Store, StoreWriter
from mmloader.store.schema import table_schema

SMOKE = dict(minutes=0.1, recordings=4, repeat=1)


def write_store(url: str, recordings: int, seconds: float, hz: float, channels: int) -> None:
    n = int(seconds * hz)
    t = (np.arange(n, dtype=np.int64) * (1e9 / hz)).astype(np.int64)
    rng = np.random.default_rng(0)
    rec_rows, stream_rows = [], []
    with StoreWriter(url, dataset="bench", source_fingerprint="bench") as w:
        for i in range(recordings):
            rid = f"rec{i:05d}"
            data = rng.standard_normal((n, channels)).astype(np.float32)
            rel = w.write_timeseries(rid, "imu", t, data, [f"c{k}" for k in range(channels)], ["u"] * channels, hz)
            rec_rows.append({"recording_id": rid, "dataset": "bench", "split": "train", "duration_ns": int(t[-1]),
                             "modalities": ["imu"], "meta_json": None})
            stream_rows.append({"recording_id": rid, "stream": "imu", "kind": "timeseries", "uri": rel,
                                "index_uri": None, "t_start_ns": 0, "t_end_ns": int(t[-1]), "n_samples": n,
                                "rate_hz": hz, "channels": [f"c{k}" for k in range(channels)],
                                "units": ["u"] * channels, "width": None, "height": None, "codec": None})
        w.write_table("recordings", pa.Table.from_pylist(rec_rows, schema=table_schema("recordings")))
        streams_schema = table_schema("streams")
        extra = [f.name for f in streams_schema if f.name not in stream_rows[0]]  # columns added by later versions
        for row in stream_rows:
            row.update({name: None for name in extra})
        w.write_table("streams", pa.Table.from_pylist(stream_rows, schema=streams_schema))
        w.write_table("gaps", pa.Table.from_pylist([], schema=table_schema("gaps")))


def time_reads(long_url: str, many_url: str, args) -> dict:
    """The read cases of the module docstring, each the best of ``args.repeat`` runs on a fresh Store."""
    out: dict = {}
    step = int(args.window * 1e9)
    starts = list(range(0, int(args.minutes * 60 * 1e9) - step, step))

    def imu_windows() -> None:
        s = Store(long_url)
        for t0 in starts:
            s.timeseries_slice("rec00000", "imu", t0, t0 + step)

    dt = best(imu_windows, args.repeat)
    out["imu_windows"] = {"windows": len(starts), "seconds": round(dt, 4),
                          "us_per_window": round(dt / max(len(starts), 1) * 1e6, 1)}
    dt = best(lambda: Store(long_url).read_timeseries("rec00000", "imu"), args.repeat)
    out["imu_whole"] = {"rows": int(args.minutes * 60 * args.hz), "seconds": round(dt, 4)}
    rids = [f"rec{i:05d}" for i in range(args.recordings)]

    def many() -> None:
        s = Store(many_url)
        for rid in rids:
            s.timeseries_slice(rid, "imu", 1_000_000_000, 1_000_000_000 + step)

    dt = best(many, args.repeat)
    out["many_recordings"] = {"recordings": args.recordings, "seconds": round(dt, 4),
                              "us_per_recording": round(dt / args.recordings * 1e6, 1)}
    out["open"] = {"recordings": args.recordings, "seconds": round(best(lambda: Store(many_url), args.repeat), 4)}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--hz", type=float, default=200.0)
    ap.add_argument("--channels", type=int, default=6)
    ap.add_argument("--window", type=float, default=2.0, help="seconds per window")
    ap.add_argument("--recordings", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    args = parse_args(ap, SMOKE, argv)

    out: dict = {"mmloader": mmloader.__version__, "mmloader_path": os.path.dirname(mmloader.__file__),
                 "machine": machine(), "args": vars(args)}
    with workdir() as work:
        long_url, many_url = str(work / "long"), str(work / "many")
        with Timer() as t:
            write_store(long_url, 1, args.minutes * 60, args.hz, args.channels)
        out["write_long_s"] = round(t.seconds, 3)
        with Timer() as t:
            write_store(many_url, args.recordings, 10.0, args.hz, args.channels)
        out["write_many_s"] = round(t.seconds, 3)
        out.update(time_reads(long_url, many_url, args))
        out["validate_long_s"] = round(best(lambda: Store(long_url).validate(), 1), 3)
        out["validate_many_s"] = round(best(lambda: Store(many_url).validate(), 1), 3)
        out["store_bytes_many"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(many_url) for f in fs)
    emit(out)


if __name__ == "__main__":
    main()
