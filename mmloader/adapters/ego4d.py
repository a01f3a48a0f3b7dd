"""The Ego4D recipe: native layout → store.

Reads (``ROOT`` may hold them directly or under ``v2/`` or ``v1/``)::

    ego4d.json                          videos[]: video_uid, duration_sec, has_imu, video_metadata, split_*
    full_scale/<video_uid>.mp4          canonical videos (probed with PyAV: fps, size, codec, pts index)
    imu/<video_uid>.csv                 ~200 Hz IMU on the canonical clock (repaired: see ego4d_imu)
    annotations/narration.json          narrations and summaries (either pass may be missing)
    annotations/sample_activity_segments.json   optional, written by the sample generator only

Clock: canonical video time, int64 ns. Every video with at least one downloaded file (mp4 or IMU CSV)
becomes a recording; its ``modalities`` say which streams it has.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pyarrow as pa
from tqdm.auto import tqdm

from ..errors import SourceFormatError
from ..fsutil import get_fs, join, normalize_url, read_json
from ..media import probe_video
from ..store.writer import StoreWriter
from .ego4d_imu import CHANNELS, UNITS, read_imu_csv
from .ego4d_narration import read_narrations

RECIPE_VERSION = 1
SPLIT_FIELDS = ("split_fho", "split_em", "split_av")


class Ego4DLayout:
    """Where the files of an Ego4D download are."""

    def __init__(self, root: str):
        self.root = normalize_url(root)
        self.fs, _ = get_fs(self.root)
        candidates = [join(self.root, "ego4d.json"), join(self.root, "v2", "ego4d.json"), join(self.root, "v1", "ego4d.json")]
        self.metadata = next((c for c in candidates if self.fs.exists(c)), None)
        if self.metadata is None:
            if not self.fs.exists(self.root):
                raise SourceFormatError(self.root, "no such directory", "an Ego4D download")
            raise SourceFormatError(self.root, "no ego4d.json found", "ego4d.json at the root or under v2/ or v1/")
        data_dirs = [join(self.root, "v2"), join(self.root, "v1"), self.root]
        self.data_dir = next(
            (d for d in data_dirs if any(self.fs.exists(join(d, s)) for s in ("full_scale", "imu", "annotations"))),
            os.path.dirname(self.metadata),
        )
        self.video_dir = join(self.data_dir, "full_scale")
        self.imu_dir = join(self.data_dir, "imu")
        self.narration = join(self.data_dir, "annotations", "narration.json")
        self.activities = join(self.data_dir, "annotations", "sample_activity_segments.json")

    def listing(self, directory: str, suffix: str) -> dict[str, dict[str, Any]]:
        """Files in ``directory`` ending with ``suffix``: stem → fsspec info."""
        if not self.fs.exists(directory):
            return {}
        out = {}
        for info in self.fs.ls(directory, detail=True):
            name = os.path.basename(info["name"].rstrip("/"))
            if name.endswith(suffix):
                out[name[: -len(suffix)]] = info
        return out

    def source_files(self) -> list[dict[str, Any]]:
        files = [self.fs.info(p) for p in (self.metadata, self.narration, self.activities) if self.fs.exists(p)]
        files += list(self.listing(self.video_dir, ".mp4").values())
        files += list(self.listing(self.imu_dir, ".csv").values())
        return files


def read_metadata(path: str) -> list[dict[str, Any]]:
    """``videos[]`` of ego4d.json, each checked for ``video_uid`` (str) and ``duration_sec`` (number)."""
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("videos"), list):
        raise SourceFormatError(path, "no 'videos' list at the top level", "an object with a 'videos' array")
    videos = doc["videos"]
    for i, v in enumerate(videos):
        where = f"videos[{i}]"
        if not isinstance(v, dict):
            raise SourceFormatError(path, f"{where} is a {type(v).__name__}", "an object")
        if not isinstance(v.get("video_uid"), str) or not v["video_uid"]:
            raise SourceFormatError(path, f"{where}: field 'video_uid' is {v.get('video_uid')!r}", "a non-empty string")
        d = v.get("duration_sec")
        if isinstance(d, bool) or not isinstance(d, (int, float)) or d <= 0:
            raise SourceFormatError(path, f"{where} ({v['video_uid']}): field 'duration_sec' is {d!r}", "a positive number")
        vm = v.get("video_metadata")
        if vm is not None and not isinstance(vm, dict):
            raise SourceFormatError(path, f"{where} ({v['video_uid']}): field 'video_metadata' is not an object", "an object")
    return videos


def read_activity_segments(path: str) -> dict[str, list[dict[str, Any]]]:
    """The sample generator's ground-truth segments: ``{uid: [{start_sec, end_sec, activity}]}`` → event rows."""
    doc = read_json(path)
    out: dict[str, list[dict[str, Any]]] = {}
    for uid, segs in doc.items():
        rows = []
        for i, s in enumerate(segs):
            try:
                t0, t1, label = float(s["start_sec"]), float(s["end_sec"]), str(s["activity"])
            except (KeyError, TypeError, ValueError):
                raise SourceFormatError(path, f"video {uid} segment {i}: {s!r}", "start_sec, end_sec, activity") from None
            rows.append({"recording_id": uid, "t_start_ns": round(t0 * 1e9), "t_end_ns": round(t1 * 1e9),
                         "text": label, "text_raw": label, "kind": "label", "source": "sample_activity_segments",
                         "uid": f"{uid}:activity:{i}"})
        out[uid] = rows
    return out


def _split(video: dict[str, Any], fields: tuple[str, ...]) -> str | None:
    for f in fields:
        v = video.get(f)
        if isinstance(v, str) and v:
            return v.lower()
        if isinstance(v, list) and v:
            return str(v[0]).lower()
    return None


class Ego4DAdapter:
    """Prepares an Ego4D download (or the sample generator's tree) into a store."""

    name = "ego4d"

    def fingerprint(self, root: str) -> str:
        layout = Ego4DLayout(root)
        h = hashlib.sha256(f"ego4d-recipe-{RECIPE_VERSION}".encode())
        for info in sorted(layout.source_files(), key=lambda i: i["name"]):
            h.update(f"{info['name']}|{info.get('size')}|{info.get('mtime', info.get('LastModified', ''))}\n".encode())
        return h.hexdigest()[:32]

    def prepare(
        self,
        root: str,
        dst: str,
        *,
        overwrite: bool = False,
        progress: bool = True,
        errors: str = "raise",
        split_fields: tuple[str, ...] = SPLIT_FIELDS,
        imu_gap_factor: float = 5.0,
        storage_options: dict[str, Any] | None = None,
    ) -> str:
        """Write the store. ``errors="raise"`` aborts on the first bad file (nothing is left at ``dst``);
        ``errors="skip"`` leaves that recording out and records why in the prepare report.
        ``storage_options`` configure the filesystem of ``dst`` (e.g. an S3 endpoint and keys)."""
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
        layout = Ego4DLayout(root)
        videos = read_metadata(layout.metadata)
        mp4s = layout.listing(layout.video_dir, ".mp4")
        csvs = layout.listing(layout.imu_dir, ".csv")
        narrations = read_narrations(layout.narration) if layout.fs.exists(layout.narration) else {}
        activities = read_activity_segments(layout.activities) if layout.fs.exists(layout.activities) else {}
        options = {"errors": errors, "split_fields": list(split_fields), "imu_gap_factor": imu_gap_factor}

        recordings, streams, gaps = [], [], []
        events: dict[str, list[dict[str, Any]]] = {"narrations": [], "summaries": [], "activities": []}
        report: dict[str, Any] = {"dataset": "ego4d", "source": layout.root, "metadata": layout.metadata,
                                  "recordings": {}, "skipped": {}, "failed": {}}
        with StoreWriter(dst, dataset="ego4d", source_fingerprint=self.fingerprint(root), options=options,
                         overwrite=overwrite, **(storage_options or {})) as writer:
            for video in tqdm(videos, desc="prepare ego4d", unit="video", disable=not progress):
                uid = video["video_uid"]
                if uid not in mp4s and uid not in csvs:
                    report["skipped"][uid] = "not downloaded (no mp4, no IMU CSV)"
                    continue
                try:
                    rec = self._recording(writer, layout, video, mp4s, csvs, narrations, activities,
                                          split_fields, imu_gap_factor)
                except SourceFormatError as e:
                    if errors == "raise":
                        raise
                    report["failed"][uid] = str(e)
                    continue
                recordings.append(rec["recording"])
                streams.extend(rec["streams"])
                gaps.extend(rec["gaps"])
                for name, rows in rec["events"].items():
                    events[name].extend(rows)
                report["recordings"][uid] = rec["report"]
            if not recordings:
                raise SourceFormatError(layout.root, "no video of ego4d.json has a downloaded mp4 or IMU CSV",
                                        f"files under {layout.video_dir} or {layout.imu_dir}")
            writer.write_table("recordings", pa.Table.from_pylist(recordings))
            writer.write_table("streams", _streams_table(streams))
            writer.write_table("gaps", pa.Table.from_pylist(gaps, schema=_gap_schema()))
            for name, rows in events.items():
                if rows:
                    writer.write_events(name, pa.Table.from_pylist(rows))
            report["totals"] = _totals(report)
            writer.write_json("reports/prepare.json", report)
        return writer.url

    def _recording(self, writer, layout, video, mp4s, csvs, narrations, activities, split_fields, gap_factor):
        uid = video["video_uid"]
        duration = float(video["duration_sec"])
        rep: dict[str, Any] = {"warnings": []}
        streams, gaps, evs = [], [], {}
        if uid in mp4s:
            url = join(layout.video_dir, f"{uid}.mp4")
            info = probe_video(url)
            rel = writer.write_video_index(uid, "video", info.pts_ns, info.keyframe)
            streams.append({"recording_id": uid, "stream": "video", "kind": "video", "uri": url, "index_uri": rel,
                            "t_start_ns": int(info.pts_ns[0]), "t_end_ns": int(info.pts_ns[-1]),
                            "n_samples": info.num_frames, "rate_hz": info.fps, "width": info.width,
                            "height": info.height, "codec": info.codec})
            rep["video"] = {"frames": info.num_frames, "fps": info.fps, "size": [info.width, info.height],
                            "codec": info.codec, "first_pts_sec": info.pts_ns[0] / 1e9}
            declared = (video.get("video_metadata") or {}).get("num_frames")
            if isinstance(declared, int) and abs(declared - info.num_frames) > 1:
                rep["warnings"].append(f"ego4d.json declares {declared} frames, the mp4 has {info.num_frames}")
        else:
            rep["warnings"].append("no mp4 (full_scale) downloaded")
        if uid in csvs:
            imu = read_imu_csv(join(layout.imu_dir, f"{uid}.csv"), duration_sec=duration, gap_factor=gap_factor)
            rep["imu"] = imu.report
            if imu.t_ns.size >= 2:
                rate = float(round(imu.report["measured_rate_hz"]))
                rel = writer.write_timeseries(uid, "imu", imu.t_ns, imu.data, CHANNELS, UNITS, rate_hz=rate)
                streams.append({"recording_id": uid, "stream": "imu", "kind": "timeseries", "uri": rel,
                                "t_start_ns": int(imu.t_ns[0]), "t_end_ns": int(imu.t_ns[-1]),
                                "n_samples": int(imu.t_ns.size), "rate_hz": rate, "channels": CHANNELS,
                                "units": UNITS})
                gaps.extend({"recording_id": uid, "stream": "imu", "t_start_ns": a, "t_end_ns": b} for a, b in imu.gaps)
            else:
                rep["warnings"].append(f"IMU CSV has {imu.t_ns.size} valid rows: no imu stream")
            if video.get("has_imu") is False:
                rep["warnings"].append("ego4d.json says has_imu false, but an IMU CSV exists; it was used")
        elif video.get("has_imu"):
            rep["warnings"].append("ego4d.json says has_imu true, but no IMU CSV was downloaded")
        rows = narrations.get(uid, [])
        for name, kind in (("narrations", "narration"), ("summaries", "summary")):
            sel = [r for r in rows if r["kind"] == kind]
            if sel:
                evs[name] = sel
        if activities.get(uid):
            evs["activities"] = activities[uid]
        for name, sel in evs.items():
            streams.append({"recording_id": uid, "stream": name, "kind": "events", "uri": f"events/{name}.parquet",
                            "t_start_ns": min(r["t_start_ns"] for r in sel), "t_end_ns": max(r["t_end_ns"] for r in sel),
                            "n_samples": len(sel)})
        rep["events"] = {name: len(sel) for name, sel in evs.items()}
        recording = {"recording_id": uid, "dataset": "ego4d", "split": _split(video, split_fields),
                     "duration_ns": round(duration * 1e9), "modalities": [s["stream"] for s in streams],
                     "meta_json": json.dumps(video, sort_keys=True)}
        return {"recording": recording, "streams": streams, "gaps": gaps, "events": evs, "report": rep}


def _streams_table(rows: list[dict[str, Any]]) -> pa.Table:
    from ..schema import table_schema

    schema = table_schema("streams")
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def _gap_schema() -> pa.Schema:
    from ..schema import table_schema

    return table_schema("gaps")


def _totals(report: dict[str, Any]) -> dict[str, Any]:
    dropped: dict[str, int] = {}
    fixed: dict[str, int] = {}
    n_gaps = 0
    for rec in report["recordings"].values():
        imu = rec.get("imu") or {}
        for k, v in imu.get("dropped", {}).items():
            dropped[k] = dropped.get(k, 0) + v
        for k, v in imu.get("fixed", {}).items():
            fixed[k] = fixed.get(k, 0) + v
        n_gaps += len(imu.get("gaps_sec", []))
    return {"recordings": len(report["recordings"]), "skipped": len(report["skipped"]),
            "failed": len(report["failed"]), "imu_rows_dropped": dropped, "imu_rows_fixed": fixed,
            "imu_gaps": n_gaps}
