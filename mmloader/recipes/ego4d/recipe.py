"""The Ego4D recipe: native layout → store.

Reads (``ROOT`` may hold them directly or under ``v2/`` or ``v1/``)::

    ego4d.json                          videos[]: video_uid, duration_sec, has_imu, video_metadata, split_*
    full_scale/<video_uid>.mp4          canonical videos (probed with PyAV: fps, size, codec, pts index)
    imu/<video_uid>.csv                 ~200 Hz IMU on the canonical clock (repaired: see .imu)
    annotations/narration.json          narrations and summaries (either pass may be missing)
    annotations/sample_activity_segments.json   optional, written by the sample generator only

Clock: canonical video time, int64 ns. Every video with at least one downloaded file (mp4 or IMU CSV)
becomes a recording; its ``modalities`` say which streams it has.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ...errors import SourceFormatError, StoreFormatError
from ...fsutil import get_fs, join, normalize_url, read_json
from ...store.writer import StoreWriter, check_recording_id
from ...video.probe import copy_media as _copy_media
from ...video.probe import media_identity, probe_video
from ...video.transcode import VideoProfile, resolve_profile
from ..base import (Prepare, SkipRecording, check_errors, count_totals, source_digest, sum_counts,
                    summarize_failed)
from ..imu import CHANNELS, UNITS
from ..media import transcode_into_store
from ..rows import RecordingRows, event_row, meta_json, video_report
from .imu import read_imu_csv
from .narration import MAX_SECONDS, check_seconds, parse_narrations

RECIPE_VERSION = 1
SPLIT_FIELDS = ("split_fho", "split_em", "split_av")
MAX_FPS = 1000.0
MAX_FRAMES = 10**9
EVENTS = {"narrations": "narration", "summaries": "summary"}  # events table → kind of narration.json rows
# video_metadata fields that are seconds → their lower bound (starts may be negative: mp4 edit lists)
METADATA_SECONDS = {"video_start_sec": -MAX_SECONDS, "video_duration_sec": 0.0, "mp4_duration_sec": 0.0,
                    "audio_start_sec": -MAX_SECONDS, "audio_duration_sec": 0.0}


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


@dataclass
class Metadata:
    """``videos[]`` of ego4d.json after the checks of ``check_metadata``.

    ``videos``: the entries kept, each ``video_uid`` once. ``failed``: ``{uid (or "videos[i]"): why}`` for
    entries left out under ``errors="skip"``. ``duplicates``: ``{uid: what was done}`` for every
    ``video_uid`` listed more than once.
    """

    videos: list[dict[str, Any]]
    failed: dict[str, str] = field(default_factory=dict)
    duplicates: dict[str, str] = field(default_factory=dict)


def read_metadata(path: str, *, split_fields: tuple[str, ...] = SPLIT_FIELDS) -> list[dict[str, Any]]:
    """``videos[]`` of ego4d.json; the first bad entry or repeated ``video_uid`` raises (see ``check_metadata``)."""
    return check_metadata(path, split_fields=split_fields).videos


def check_metadata(path: str, *, split_fields: tuple[str, ...] = SPLIT_FIELDS, errors: str = "raise") -> Metadata:
    """Read and check ``videos[]`` of ego4d.json.

    Each entry: an object; ``video_uid`` a non-empty string that is a safe path component (the store's id
    rule, ``check_recording_id``); ``duration_sec`` finite, > 0 and <= ``MAX_SECONDS``; ``video_metadata``
    an object or absent, with ``fps`` in (0, ``MAX_FPS``], ``num_frames`` an integer >= 0, its ``*_sec``
    fields finite and bounded; the split fields a string (or a list of one distinct string); no NaN or
    Infinity anywhere in the entry (Python's json reads them; they would end in ``meta_json``).
    ``video_uid`` must be unique: a recording listed twice would sit in two splits, its IMU written twice.

    ``errors="raise"``: the first problem raises SourceFormatError naming the file, ``videos[i]``, the
    uid and the field. ``errors="skip"``: a bad entry is left out (``failed``); a ``video_uid`` listed more
    than once is kept once if all its copies are identical (``duplicates``), else every copy is left out
    (which one is right cannot be known) and listed in both ``failed`` and ``duplicates``.
    """
    check_errors(errors)
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("videos"), list):
        raise SourceFormatError(path, "no 'videos' list at the top level", "an object with a 'videos' array")
    out = Metadata(videos=[])
    seen: dict[str, list[int]] = {}
    problems: dict[int, str] = {}
    for i, v in enumerate(doc["videos"]):
        try:
            uid = _check_video(path, i, v, split_fields)
        except SourceFormatError as e:
            if errors == "raise":
                raise
            uid = v.get("video_uid") if isinstance(v, dict) else None
            if not isinstance(uid, str) or not uid:
                out.failed[f"videos[{i}]"] = str(e)
                continue
            problems[i] = str(e)
        if uid in seen and errors == "raise":
            first = seen[uid][0]
            raise SourceFormatError(path, f"videos[{i}]: field 'video_uid' {uid!r} is also the video_uid of "
                                    f"videos[{first}] (a recording listed twice would sit in two splits)",
                                    "each video_uid once (--errors skip keeps one of identical copies, "
                                    "else leaves them all out)")
        seen.setdefault(uid, []).append(i)
    videos = doc["videos"]
    for uid, idx in seen.items():
        if len(idx) > 1:
            where = ", ".join(f"videos[{i}]" for i in idx)
            same = all(json.dumps(videos[i], sort_keys=True) == json.dumps(videos[idx[0]], sort_keys=True)
                       for i in idx[1:])
            if same and idx[0] not in problems:
                out.duplicates[uid] = f"listed {len(idx)} times in ego4d.json ({where}), identical: kept {where.split(',')[0]}"
            else:
                why = "identical but invalid" if same else "with different contents"
                out.duplicates[uid] = f"listed {len(idx)} times in ego4d.json ({where}) {why}: all copies left out"
                out.failed[uid] = (f"{path}: field 'video_uid' {uid!r} is listed {len(idx)} times ({where}) {why}; "
                                   "which copy is right cannot be known: all left out")
                continue
        if idx[0] in problems:
            out.failed[uid] = problems[idx[0]]
            continue
        out.videos.append(videos[idx[0]])
    return out


def _check_video(path: str, i: int, v: Any, split_fields: tuple[str, ...]) -> str:
    """The ``video_uid`` of entry ``i`` after its checks (see ``check_metadata``); SourceFormatError otherwise."""
    where = f"videos[{i}]"
    if not isinstance(v, dict):
        raise SourceFormatError(path, f"{where} is a {type(v).__name__}", "an object")
    uid = v.get("video_uid")
    if not isinstance(uid, str) or not uid:
        raise SourceFormatError(path, f"{where}: field 'video_uid' is {uid!r}", "a non-empty string")
    try:
        check_recording_id(uid, f"{where}: field 'video_uid'")
    except StoreFormatError as e:
        raise SourceFormatError(path, str(e), "a video_uid usable as a recording id") from None
    where = f"{where} ({uid})"
    check_seconds(v.get("duration_sec"), "duration_sec", where, path, lo_open=True)
    vm = v.get("video_metadata")
    if vm is not None:
        if not isinstance(vm, dict):
            raise SourceFormatError(path, f"{where}: field 'video_metadata' is not an object", "an object")
        fps = vm.get("fps")
        if fps is not None:
            ok = not isinstance(fps, bool) and isinstance(fps, (int, float)) and math.isfinite(fps) and 0 < fps <= MAX_FPS
            if not ok:
                raise SourceFormatError(path, f"{where}: field 'video_metadata.fps' is {fps!r}",
                                        f"a finite number of frames per second, > 0 and <= {MAX_FPS:g}")
        n = vm.get("num_frames")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_FRAMES):
            raise SourceFormatError(path, f"{where}: field 'video_metadata.num_frames' is {n!r}",
                                    f"an integer >= 0 and <= {MAX_FRAMES}")
        for key, lo in METADATA_SECONDS.items():
            if vm.get(key) is not None:
                check_seconds(vm[key], f"video_metadata.{key}", where, path, lo=lo)
    bad = _non_finite(v)
    if bad is not None:
        raise SourceFormatError(path, f"{where}: field '{bad[0]}' is {bad[1]!r}", "finite numbers only (no NaN or Infinity)")
    try:
        _split(v, split_fields)
    except ValueError as e:
        raise SourceFormatError(path, f"{where}: {e}", "a split name (a string, or a list of one distinct string)") from None
    return uid


def _non_finite(obj: Any, prefix: str = "") -> tuple[str, float] | None:
    """``(dotted field, value)`` of the first NaN or ±Infinity inside a JSON value, or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return prefix, obj
    if isinstance(obj, dict):
        items = ((f"{prefix}.{k}" if prefix else str(k), x) for k, x in obj.items())
    elif isinstance(obj, list):
        items = ((f"{prefix}[{j}]", x) for j, x in enumerate(obj))
    else:
        return None
    for name, x in items:
        found = _non_finite(x, name)
        if found is not None:
            return found
    return None


def read_activity_segments(path: str) -> dict[str, list[dict[str, Any]]]:
    """The sample generator's ground-truth segments: ``{uid: [{start_sec, end_sec, activity}]}`` → event rows."""
    doc = read_json(path)
    if not isinstance(doc, dict) or not all(isinstance(v, list) for v in doc.values()):
        raise SourceFormatError(path, "top level is not an object of lists", "{video_uid: [segments]}")
    out: dict[str, list[dict[str, Any]]] = {}
    for uid, segs in doc.items():
        rows = []
        for i, s in enumerate(segs):
            try:
                t0, t1, label = float(s["start_sec"]), float(s["end_sec"]), str(s["activity"])
            except (KeyError, TypeError, ValueError, OverflowError):
                raise SourceFormatError(path, f"video {uid} segment {i}: {s!r}", "start_sec, end_sec, activity") from None
            check_seconds(t0, "start_sec", f"video {uid} segment {i}", path)
            check_seconds(t1, "end_sec", f"video {uid} segment {i}", path, lo=t0)
            rows.append(event_row(uid, round(t0 * 1e9), round(t1 * 1e9), label, kind="label",
                                  source="sample_activity_segments", uid=f"{uid}:activity:{i}"))
        out[uid] = rows
    return out


def _split(video: dict[str, Any], fields: tuple[str, ...]) -> str | None:
    """The split of a video: the first of ``fields`` that is set, lower-cased; ValueError naming the field
    when it is neither a string nor a list of one distinct string (a list of several would put the
    recording in two splits)."""
    for f in fields:
        v = video.get(f)
        if v is None or v == "" or v == []:
            continue
        if isinstance(v, str):
            return v.strip().lower()
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            names = sorted({x.strip().lower() for x in v})
            if len(names) == 1:
                return names[0]
            raise ValueError(f"field '{f}' is {v!r}, several splits for one recording")
        raise ValueError(f"field '{f}' is {v!r}")
    return None


class Ego4DAdapter:
    """Prepares an Ego4D download (or the sample generator's tree) into a store."""

    name = "ego4d"

    def fingerprint(self, root: str) -> str:
        files = sorted(Ego4DLayout(root).source_files(), key=lambda i: i["name"])
        return source_digest(f"ego4d-recipe-{RECIPE_VERSION}", (
            f"{i['name']}|{i.get('size')}|{i.get('mtime', i.get('LastModified', ''))}" for i in files))

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
        copy_media: bool = False,
        video_profile: str | VideoProfile | None = None,
    ) -> str:
        """Write the store. ``errors="raise"`` aborts on the first bad file or entry (nothing is left at
        ``dst``); ``errors="skip"`` leaves that recording out (a bad narration event: that event) and records
        why in the prepare report (``failed``, ``duplicates``, per recording ``events_dropped``); see
        ``check_metadata`` for the rule on a ``video_uid`` listed twice.
        ``storage_options`` configure the filesystem of ``dst`` (e.g. an S3 endpoint and keys).
        ``copy_media=True`` (``prepare --copy-media``) copies every mp4 into the store (``media/<uid>.mp4``,
        referenced relative to the store root): the store is self-contained and can be moved, copied or
        uploaded; by default the store references the source mp4s by absolute path/URL. Either way each mp4's
        size, mtime and fast hash are recorded and checked when a reader opens it.
        ``video_profile`` (``prepare --video-profile NAME``, a name of ``mmloader.video.VIDEO_PROFILES`` or a
        ``VideoProfile``) instead transcodes each mp4 once into the store (short GOP, training size, optional
        fps; every kept frame at its source capture time), for training that decodes video every epoch in a
        shuffled order; the profile is recorded in the manifest's options and in the report."""
        check_errors(errors)
        profile = resolve_profile(video_profile)
        if profile is not None and copy_media:
            raise ValueError("copy_media and video_profile exclude each other: a profile already writes the "
                             "(transcoded) video into the store")
        layout = Ego4DLayout(root)
        meta = check_metadata(layout.metadata, split_fields=split_fields, errors=errors)
        videos = _Videos(layout, split_fields, imu_gap_factor, bool(copy_media), meta.duplicates, profile)
        if layout.fs.exists(layout.narration):
            videos.narrations, videos.narrations_dropped = parse_narrations(layout.narration, errors=errors)
        if layout.fs.exists(layout.activities):
            videos.activities = read_activity_segments(layout.activities)
        run = Prepare(
            dataset="ego4d", root=root, dst=dst, fingerprint=self.fingerprint(root), errors=errors,
            options={"errors": errors, "split_fields": list(split_fields), "imu_gap_factor": imu_gap_factor,
                     "copy_media": bool(copy_media),
                     "video_profile": profile.describe() if profile is not None else None},
            overwrite=overwrite, progress=progress, storage_options=storage_options, unit="video",
            report={"dataset": "ego4d", "source": layout.root, "metadata": layout.metadata, "failed": meta.failed,
                    "duplicates": dict(meta.duplicates)},
            event_names=(*EVENTS, "activities"))
        return run.run([(v["video_uid"], v) for v in meta.videos], videos.recording, totals=_totals,
                       nothing_prepared=videos.nothing_prepared)


class _Videos:
    """The parsed sources of one prepare, and how one ``videos[]`` entry becomes a recording."""

    def __init__(self, layout: Ego4DLayout, split_fields: tuple[str, ...], gap_factor: float, copy_media: bool,
                 duplicates: dict[str, str], profile: VideoProfile | None = None):
        self.layout, self.split_fields, self.gap_factor = layout, split_fields, gap_factor
        self.copy_media, self.duplicates, self.profile = copy_media, duplicates, profile
        self.mp4s = layout.listing(layout.video_dir, ".mp4")
        self.csvs = layout.listing(layout.imu_dir, ".csv")
        self.narrations: dict[str, list[dict[str, Any]]] = {}
        self.narrations_dropped: dict[str, dict[str, Any]] = {}
        self.activities: dict[str, list[dict[str, Any]]] = {}

    def recording(self, writer: StoreWriter, video: dict[str, Any]) -> RecordingRows:
        """The streams of one video: its mp4 (pts index), its IMU CSV (repaired) and its events."""
        uid = video["video_uid"]
        if uid not in self.mp4s and uid not in self.csvs:
            raise SkipRecording("not downloaded (no mp4, no IMU CSV)")
        rec = RecordingRows(uid, report={"warnings": []})
        if uid in self.mp4s:
            self._video(writer, rec, video)
        else:
            rec.report["warnings"].append("no mp4 (full_scale) downloaded")
        self._imu(writer, rec, video)
        rows = self.narrations.get(uid, [])
        for name, kind in EVENTS.items():
            sel = [r for r in rows if r["kind"] == kind]
            if sel:
                rec.add_events(name, sel)
        if self.activities.get(uid):
            rec.add_events("activities", self.activities[uid])
        rec.report["events"] = {name: len(sel) for name, sel in rec.events.items()}
        if uid in self.narrations_dropped:
            d = self.narrations_dropped[uid]
            rec.report["events_dropped"] = d
            rec.report["warnings"].append(f"narration.json: {d['events']} bad event(s) dropped")
        if uid in self.duplicates:
            rec.report["warnings"].append(self.duplicates[uid])
        rec.set_recording("ego4d", _split(video, self.split_fields), round(float(video["duration_sec"]) * 1e9),
                          [s["stream"] for s in rec.streams], meta_json(video))
        return rec

    def _video(self, writer: StoreWriter, rec: RecordingRows, video: dict[str, Any]) -> None:
        uid = rec.recording_id
        src = join(self.layout.video_dir, f"{uid}.mp4")
        if self.profile is not None:
            out = transcode_into_store(writer, src, uid, "video", self.profile)
            info = out.info
            rec.write_video(writer, "video", out.uri, info, identity=out.identity)
            rec.report["video"] = {**video_report(info), "transcoded": out.report}
        else:
            url, uri, opts = _media_file(writer, src, uid, self.copy_media)
            ident = media_identity(url, opts)  # before probing: the index describes this very file
            info = probe_video(url, opts)
            rec.write_video(writer, "video", uri, info, identity=ident)
            rec.report["video"] = video_report(info)
        declared = (video.get("video_metadata") or {}).get("num_frames")
        if isinstance(declared, int) and abs(declared - info.num_frames) > 1:
            rec.report["warnings"].append(f"ego4d.json declares {declared} frames, the mp4 has {info.num_frames}")

    def _imu(self, writer: StoreWriter, rec: RecordingRows, video: dict[str, Any]) -> None:
        uid, warnings = rec.recording_id, rec.report["warnings"]
        if uid not in self.csvs:
            if video.get("has_imu"):
                warnings.append("ego4d.json says has_imu true, but no IMU CSV was downloaded")
            return
        imu = read_imu_csv(join(self.layout.imu_dir, f"{uid}.csv"), duration_sec=float(video["duration_sec"]),
                           gap_factor=self.gap_factor)
        rec.report["imu"] = imu.report
        if imu.t_ns.size >= 2:
            rate = float(round(imu.report["measured_rate_hz"]))
            rec.write_timeseries(writer, "imu", imu.t_ns, imu.data, CHANNELS, UNITS, rate, imu.gaps)
        else:
            warnings.append(f"IMU CSV has {imu.t_ns.size} valid rows: no imu stream")
        if video.get("has_imu") is False:
            warnings.append("ego4d.json says has_imu false, but an IMU CSV exists; it was used")

    def nothing_prepared(self, report: dict[str, Any]) -> SourceFormatError:
        if report["failed"]:
            return SourceFormatError(self.layout.root, f"no recording could be prepared: {len(report['failed'])} "
                                     f"failed ({summarize_failed(report['failed'])})", "at least one good video")
        return SourceFormatError(self.layout.root, "no video of ego4d.json has a downloaded mp4 or IMU CSV",
                                 f"files under {self.layout.video_dir} or {self.layout.imu_dir}")


def _media_file(writer: StoreWriter, src: str, uid: str, copy: bool) -> tuple[str, str, dict[str, Any]]:
    """(URL to probe and hash, ``uri`` for the streams row, fsspec options of that URL) of a recording's
    mp4: the source file itself (absolute ``uri``), or with ``copy`` its copy at ``media/<uid>.mp4`` in the
    store being written (``uri`` relative to the store root)."""
    if not copy:
        return src, src, {}
    rel = f"media/{uid}.mp4"
    dst = join(writer.work_url, rel)
    opts = dict(writer.storage_options or {})
    _copy_media(src, dst, dst_options=opts)
    return dst, rel, opts


def _totals(report: dict[str, Any]) -> dict[str, Any]:
    """The report's totals: counts, and IMU rows dropped/fixed (by reason) and gaps over all recordings."""
    recs = report["recordings"].values()
    imus = [rec.get("imu") or {} for rec in recs]
    return {**count_totals(report), "duplicates": len(report.get("duplicates", {})),
            "events_dropped": sum((rec.get("events_dropped") or {}).get("events", 0) for rec in recs),
            "imu_rows_dropped": sum_counts(imu.get("dropped", {}) for imu in imus),
            "imu_rows_fixed": sum_counts(imu.get("fixed", {}) for imu in imus),
            "imu_gaps": sum(len(imu.get("gaps_sec", [])) for imu in imus)}
