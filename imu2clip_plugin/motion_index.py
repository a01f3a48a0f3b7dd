"""The motion index: every window of a store embedded by a trained IMU encoder, on any fsspec URL.

``build_index(encoder_dir, store, out)`` (``imu2clip index build``) embeds each window of the store (or of one split)
with the IMU encoder and, when the store has them, with the CLIP towers the encoder was trained against (the
window's frame embedding and its narration embedding), and writes::

    OUT/index.json                   the manifest, written last (format version, encoder fingerprint, towers, window
                                     spec, store identity, one entry per part with its size and sha256)
    OUT/parts/<key>.parquet          one part per recording: one row per window (recording_id, split, t0_ns, t1_ns,
                                     text, label) and fixed-size-list float32 columns imu, video, text_emb (D,)
    OUT/parts/<key>.json             the part's record (recording, rows, size, sha256), written after the part
    OUT/faiss/...                    the FAISS index, built on demand by ``search(..., faiss=True)`` (search.py)

``key`` is a hash of the recording's content in the store, its windows, the encoder's weights, the towers and
the window spec: a rebuild embeds only recordings whose part is not there yet (new recordings, or a changed
encoder / spec / recording) and reuses the others. Ranks: rank ``r`` of ``W`` embeds the recordings
``mmloader.dist.part_of(n, r, W)`` of the sorted recording ids; the manifest is written once every part exists, by
rank 0 after a barrier in a ``torch.distributed`` group, else by whichever run finds every part present (a final
one-process run reuses every part and only writes the manifest). Every file is written atomically (a temporary
name renamed into place on local disks, one PUT elsewhere), and the manifest last: a crashed build leaves the
previous manifest (or none), never an index that names a missing or half-written part.

``MotionIndex.open(url)`` checks the manifest and every part against it (size, sha256, schema, rows) and raises
:class:`MotionIndexError` naming the file and the field that is off. Times are int64 ns on each recording's clock
in the parts, float seconds in the API.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mmloader.dist import launch_rank_world, part_of
from mmloader.errors import MMLoaderError
from mmloader.fsutil import get_fs, is_local, join, normalize_url
from mmloader.windows.collate import collate
from mmloader.windows.protocol import canonical_spec, sha256_json

from .distributed import atomic_write, barrier, rank_world
from .text import text_of

__all__ = ["INDEX_FORMAT", "INDEX_FORMAT_VERSION", "MANIFEST_NAME", "MotionIndex", "MotionIndexError", "TowerSpec",
           "build_index", "encoder_fingerprint"]

INDEX_FORMAT = "imu2clip-motion-index"
INDEX_FORMAT_VERSION = 1
MANIFEST_NAME = "index.json"
PARTS_DIR = "parts"
VECTORS = {"imu": "imu", "video": "video", "text": "text_emb"}   # vector name -> its column in a part
META_COLUMNS = ("recording_id", "split", "t0_ns", "t1_ns", "text", "label")
NS = 1_000_000_000


class MotionIndexError(MMLoaderError):
    """A motion index that cannot be built or used as asked: not there, of another format version, a part missing,
    truncated or corrupt (its size or sha256 differs from the manifest), a column of the wrong shape. The message
    names the file and the field."""


# -- identities ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TowerSpec:
    """The frozen CLIP towers of an index (what ``ClipTowers`` and ``torch.manual_seed(seed)`` rebuild them from);
    ``seed`` decides random-init towers (``pretrained`` and ``checkpoint`` None), as in training."""

    model: str = "imu2clip-tiny"
    pretrained: str | None = None
    checkpoint: str | None = None
    seed: int = 0
    reduce: str = "center"

    @classmethod
    def resolve(cls, given: dict[str, Any] | None = None, encoder_dir: str | os.PathLike | None = None) -> "TowerSpec":
        """``given`` (non-None values win) over the training run's ``config.json`` beside ``encoder_dir``
        (``run_dir/encoder`` → ``run_dir/config.json``: ``model_name``, ``pretrained``, ``checkpoint``, ``seed``,
        ``reduce``) over the defaults."""
        d: dict[str, Any] = {}
        run_cfg = Path(encoder_dir).parent / "config.json" if encoder_dir is not None else None
        if run_cfg is not None and run_cfg.is_file():
            cfg = json.loads(run_cfg.read_text())
            if isinstance(cfg, dict) and "model_name" in cfg:
                d = {"model": cfg["model_name"], **{k: cfg[k] for k in ("pretrained", "checkpoint", "seed", "reduce")
                                                    if k in cfg}}
        d.update({k: v for k, v in (given or {}).items() if v is not None})
        return cls(**d)

    def build(self, device: str | torch.device = "cpu"):
        """The towers, on ``device`` (random-init ones seeded with ``seed`` first)."""
        from .towers import ClipTowers

        torch.manual_seed(self.seed)
        return ClipTowers(self.model, pretrained=self.pretrained, checkpoint=self.checkpoint, device=device)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """``sha256:<hex>`` of an encoder's config and every weight (names, dtypes, shapes, values)."""
    h = hashlib.sha256(json.dumps(encoder.config.to_dict(), sort_keys=True).encode())
    for k, v in sorted(encoder.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"\0{k}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.numpy().tobytes())
    return "sha256:" + h.hexdigest()


def store_identity(store: Any) -> dict[str, Any]:
    """What names the store an index was built from (its URL, dataset, format, generation and manifest hash)."""
    m = store.manifest
    return {"url": store.url, "dataset": store.dataset, "format_version": m.get("format_version"),
            "generation": m.get("generation"), "source_fingerprint": m.get("source_fingerprint"),
            "manifest_sha256": sha256_json(m)}


def recording_fingerprints(store: Any, rids: Sequence[str]) -> dict[str, str]:
    """One hash per recording of what the store holds for it: its ``recordings`` row, its ``streams`` rows (less
    the media path and mtime, so a relocated store keeps its hashes) and the sha256 of its files in the store."""
    want = set(rids)
    rows: dict[str, dict[str, Any]] = {r: {"recording": None, "streams": [], "files": {}} for r in want}
    for rec in store.recordings.to_pylist():
        if rec["recording_id"] in want:
            rows[rec["recording_id"]]["recording"] = rec
    for s in store.streams.to_pylist():
        if s["recording_id"] in want:
            rows[s["recording_id"]]["streams"].append({k: v for k, v in s.items() if k not in ("uri", "media_mtime_ns")})
    for rel, entry in (store.manifest.get("files") or {}).items():
        parts = rel.split("/")
        if len(parts) > 2 and parts[1] in want:
            rows[parts[1]]["files"][rel] = entry.get("sha256")
    return {r: sha256_json(rows[r]) for r in rids}


# -- files on any fsspec URL ------------------------------------------------------------------------------
def _put(fs: Any, path: str, data: bytes) -> None:
    """Write ``path`` atomically: a temporary name renamed into place on a local disk, one PUT elsewhere."""
    if is_local(fs):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(path), data)
    else:
        fs.pipe_file(path, data)


def _get(fs: Any, path: str) -> bytes | None:
    """The bytes of ``path``, None when it is not there."""
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


# -- what to embed ----------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """The windows of a build: the base set (IMU, and video when embedded), each recording's positions in it (in
    index order), each window's narration text and label, and what the manifest records about them."""

    ws: Any
    rids: list[str]
    positions: dict[str, np.ndarray]
    texts: dict[tuple[str, int], str] | None
    labels: dict[tuple[str, int], str] | None
    targets: tuple[str, ...]
    windows: dict[str, Any]
    recording_fps: dict[str, str] = field(default_factory=dict)


def _lookup(ds: Any, kw: dict[str, Any], column: str, **extra: Any) -> dict[tuple[str, int], Any]:
    """``(recording_id, t0_ns) -> value of column`` over the windows ``ds.windows(**kw, **extra)`` keeps (the same
    tile grid as the base set: text and labels never change a recording's span)."""
    idx = ds.windows(**{**kw, **extra}).index
    values = idx[column].to_pylist()
    if column == "text":
        values = [text_of(v) for v in values]
    return dict(zip(zip(idx["recording_id"].to_pylist(), idx["t0_ns"].to_pylist()), values))


def plan_windows(ds: Any, window_kw: dict[str, Any], split: str | None = None,
                 recordings: Sequence[str] | None = None, targets: Sequence[str] | None = None,
                 label_stream: str | None = "activities") -> _Plan:
    """The windows a build embeds: ``ds.windows(**window_kw)`` with ``imu`` (and ``video`` when it is a target),
    of one ``split`` and/or some ``recordings``; ``targets`` (default: ``video`` and ``text`` where the store has
    video / narrations) are what the towers embed beside the IMU; ``label_stream`` (used when the store has it)
    labels the windows."""
    kw = dict(window_kw)
    if kw.get("stride") is None:
        kw["stride"] = kw["sec"] / 2
    text_stream = kw.get("text_stream", "narrations")
    if targets is None:
        targets = tuple(t for t, ok in (("video", "video" in ds.modalities),
                                        ("text", text_stream in ds.store.event_names)) if ok)
    targets = tuple(targets)
    bad = sorted(set(targets) - {"video", "text"})
    if bad:
        raise ValueError(f"targets: {bad} are not embeddable; choose among ['video', 'text']")
    base = {**kw, "modalities": ["imu", *(["video"] if "video" in targets else [])]}
    if "video" not in targets:   # frame options only describe windows with video
        for option in ("frames", "size"):
            base.pop(option, None)
    ws = ds.windows(**base)
    if split is not None:
        ws = ws.split(split)
    if recordings is not None:
        ws = ws.recordings(list(recordings))
    rid_col = ws.index["recording_id"].to_pylist()
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rid_col):
        groups.setdefault(r, []).append(i)
    texts = _lookup(ds, base, "text", modalities=[*base["modalities"], "text"]) if "text" in targets else None
    use_labels = label_stream is not None and label_stream in ds.store.event_names
    labels = _lookup(ds, base, "label", label_stream=label_stream) if use_labels else None
    windows = {"spec": canonical_spec(ws.spec), "split": split,
               "recordings": sorted(recordings) if recordings is not None else None,
               "label_stream": label_stream if use_labels else None}
    rids = sorted(groups)
    plan = _Plan(ws, rids, {r: np.asarray(groups[r], dtype=np.int64) for r in rids}, texts, labels, targets, windows)
    plan.recording_fps = recording_fingerprints(ds.store, rids)
    return plan


def _window_meta(plan: _Plan, rid: str) -> dict[str, list[Any]]:
    """The metadata columns of one recording's windows, in index order."""
    idx = plan.ws.index
    pos = plan.positions[rid]
    t0 = idx["t0_ns"].take(pa.array(pos)).to_pylist()
    keys = [(rid, t) for t in t0]
    return {"recording_id": [rid] * len(pos), "split": idx["split"].take(pa.array(pos)).to_pylist(), "t0_ns": t0,
            "t1_ns": idx["t1_ns"].take(pa.array(pos)).to_pylist(),
            "text": [plan.texts.get(k) for k in keys] if plan.texts is not None else [None] * len(pos),
            "label": [plan.labels.get(k) for k in keys] if plan.labels is not None else [None] * len(pos)}


def part_key(plan: _Plan, rid: str, meta: dict[str, list[Any]], encoder_fp: str, towers_fp: str) -> str:
    """The part's name: a hash of everything its vectors depend on."""
    return sha256_json({"format_version": INDEX_FORMAT_VERSION, "recording_id": rid,
                        "recording": plan.recording_fps[rid], "windows": sha256_json(meta), "encoder": encoder_fp,
                        "towers": towers_fp, "spec": plan.windows["spec"], "targets": list(plan.targets)})[:32]


# -- embedding one recording ------------------------------------------------------------------------------
def _fsl(x: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """``(n, D)`` float32 → a fixed-size-list<float32>[D] column (rows where ``valid`` is False are null)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    mask = None if valid is None else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1], mask=mask)


@torch.no_grad()
def _embed_recording(b: "_Build", rid: str, meta: dict[str, list[Any]]) -> pa.Table:
    """One recording's part: its windows' metadata and vectors. Batches never span two recordings, so a
    recording's vectors are the same whichever rank (or run) embeds it."""
    ws, pos, dev = b.plan.ws, b.plan.positions[rid], b.device
    ws.will_read(pos)
    imu, video = [], []
    for a in range(0, len(pos), b.batch_size):
        chunk = [int(i) for i in pos[a:a + b.batch_size]]
        batch = ws.read_batch(chunk)
        if batch is None:
            batch = collate([ws[i] for i in chunk])
        imu.append(b.encoder(batch["imu"].to(dev), batch["imu_mask"].to(dev), normalize=True).float().cpu().numpy())
        if "video" in b.plan.targets:
            video.append(b.towers.encode_frames(batch["video"].to(dev), reduce=b.tower_spec.reduce).float().cpu().numpy())
    cols: dict[str, pa.Array] = {
        "recording_id": pa.array(meta["recording_id"], pa.string()), "split": pa.array(meta["split"], pa.string()),
        "t0_ns": pa.array(meta["t0_ns"], pa.int64()), "t1_ns": pa.array(meta["t1_ns"], pa.int64()),
        "text": pa.array(meta["text"], pa.string()), "label": pa.array(meta["label"], pa.string()),
        "imu": _fsl(np.concatenate(imu))}
    if video:
        cols["video"] = _fsl(np.concatenate(video))
    if "text" in b.plan.targets:
        cols["text_emb"] = _fsl(*_embed_texts(b, meta["text"]))
    return pa.table(cols)


def _embed_texts(b: "_Build", texts: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """``(vectors (n, D), valid (n,))``: the narration embedding of each window with text, zeros elsewhere."""
    out = np.zeros((len(texts), b.dim), dtype=np.float32)
    have = np.array([t is not None for t in texts], dtype=bool)
    todo = np.flatnonzero(have)
    for a in range(0, len(todo), b.batch_size):
        rows = todo[a:a + b.batch_size]
        out[rows] = b.towers.encode_text([texts[i] for i in rows]).float().cpu().numpy()
    return out, have


# -- writing parts and the manifest -----------------------------------------------------------------------
def _part_paths(root: str, key: str) -> tuple[str, str]:
    return join(root, PARTS_DIR, f"{key}.parquet"), join(root, PARTS_DIR, f"{key}.json")


def _write_part(fs: Any, root: str, key: str, rid: str, rec_fp: str, table: pa.Table) -> dict[str, Any]:
    """Write the part, then its record (both atomically); returns the record (the manifest's entry)."""
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata({"imu2clip.part": json.dumps({"key": key, "recording_id": rid})}),
                   buf, compression="zstd")
    data = buf.getvalue()
    part, record = _part_paths(root, key)
    entry = {"recording_id": rid, "key": key, "file": f"{PARTS_DIR}/{key}.parquet", "rows": table.num_rows,
             "size": len(data), "sha256": _sha256(data), "recording_fingerprint": rec_fp}
    _put(fs, part, data)
    _put(fs, record, json.dumps(entry, indent=1).encode())
    return entry


def _read_record(fs: Any, root: str, key: str, rid: str) -> dict[str, Any] | None:
    """A part's record when the part and its record are there and agree in size; None otherwise."""
    part, record = _part_paths(root, key)
    raw = _get(fs, record)
    if raw is None:
        return None
    try:
        entry = json.loads(raw)
    except json.JSONDecodeError:
        return None   # a record torn by hand: embed the part again
    if entry.get("key") != key or entry.get("recording_id") != rid or not fs.exists(part):
        return None
    return entry if fs.size(part) == entry.get("size") else None


@dataclass
class _Build:
    """One build's state (see :func:`build_index`)."""

    plan: _Plan
    encoder: Any
    encoder_info: dict[str, Any]
    towers: Any
    tower_spec: TowerSpec
    towers_fp: str
    fs: Any
    root: str
    url: str
    device: torch.device
    batch_size: int
    store: dict[str, Any]
    dim: int
    keys: dict[str, str] = field(default_factory=dict)
    metas: dict[str, dict[str, list[Any]]] = field(default_factory=dict)


def _manifest(b: _Build, entries: list[dict[str, Any]]) -> dict[str, Any]:
    from . import __version__

    return {"format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION, "created_by": f"imu2clip_plugin {__version__}",
            "encoder": b.encoder_info, "towers": {**b.tower_spec.to_dict(), "fingerprint": b.towers_fp},
            "windows": b.plan.windows, "store": b.store, "dim": b.dim,
            "vectors": ["imu", *(t for t in ("video", "text") if t in b.plan.targets)],
            "n_windows": sum(e["rows"] for e in entries), "parts": entries}


def _finish(b: _Build) -> tuple[bool, list[str]]:
    """Write the manifest when every part is there: ``(written, recordings whose part is missing)``. In a
    ``torch.distributed`` group, rank 0 checks and writes it after a barrier, then tells every rank."""
    rank, world = rank_world()
    grouped = world > 1
    if grouped:
        barrier()
    entries, missing = [], []
    if not grouped or rank == 0:
        for rid in b.plan.rids:
            e = _read_record(b.fs, b.root, b.keys[rid], rid)
            if e is None:
                missing.append(rid)
            else:
                entries.append(e)
        if not missing:
            _put(b.fs, join(b.root, MANIFEST_NAME), json.dumps(_manifest(b, entries), indent=1).encode())
    if grouped:   # every rank learns rank 0's answer (and waits for its manifest)
        box = [missing]
        torch.distributed.broadcast_object_list(box, src=0)
        missing = box[0]
    return not missing, missing


def _load_encoder(encoder: Any, device: torch.device) -> tuple[Any, dict[str, Any]]:
    from .encoder import load_encoder

    if isinstance(encoder, (str, os.PathLike)):
        enc = load_encoder(encoder, device=device)
        path = str(Path(encoder).resolve())
    else:
        enc, path = encoder.to(device).eval(), None
    return enc, {"path": path, "fingerprint": encoder_fingerprint(enc), "config": enc.config.to_dict()}


def build_index(encoder: Any, store: Any, out: str | os.PathLike, *, sec: float = 5.0, stride: float | None = None,
                anchor: str = "tile", imu_hz: float = 200.0, frames: int = 1, size: tuple[int, int] | None = (64, 64),
                video_backend: str = "auto", split: str | None = None, recordings: Sequence[str] | None = None,
                targets: Sequence[str] | None = None, label_stream: str | None = "activities",
                towers: TowerSpec | dict[str, Any] | None = None, rank: int | None = None,
                world_size: int | None = None, batch_size: int = 64, device: str | None = None,
                progress: bool = False, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Embed the windows of ``store`` with ``encoder`` (a ``save_encoder`` directory or an ``IMUEncoder``) into the
    index at ``out`` (module docstring). Window options as ``Dataset.windows`` (``stride`` default ``sec / 2``);
    ``towers``: a :class:`TowerSpec` or its fields, the rest from the run's ``config.json`` beside the encoder
    directory (:meth:`TowerSpec.resolve`). ``rank`` / ``world_size``: ``mmloader.dist.launch_rank_world``.

    Returns ``{"url", "rank", "world_size", "recordings", "windows", "embedded", "reused", "complete", "missing"}``:
    parts this run embedded and reused (of its share), and whether the manifest was written (``missing``: the
    recordings whose part is not there yet, when it was not)."""
    import mmloader

    rank, world = launch_rank_world(rank, world_size)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    enc, enc_info = _load_encoder(encoder, dev)
    spec = towers if isinstance(towers, TowerSpec) else TowerSpec.resolve(
        towers, encoder if isinstance(encoder, (str, os.PathLike)) else None)
    ds = store if hasattr(store, "windows") else mmloader.open(store)
    plan = plan_windows(ds, {"sec": sec, "stride": stride, "anchor": anchor, "imu_hz": imu_hz, "frames": frames,
                             "size": size, "video_backend": video_backend}, split, recordings, targets, label_stream)
    if not plan.rids:
        raise MotionIndexError(f"{ds.url}: no windows to index (split={split!r}, recordings={recordings!r}; "
                               f"windows report: {plan.ws.report()})")
    from .embed import towers_fingerprint

    tw = spec.build(dev)
    if tw.embed_dim != enc.config.embed_dim:
        raise MotionIndexError(f"{enc_info['path']}: the encoder embeds into {enc.config.embed_dim} dimensions but "
                               f"{spec.model} has {tw.embed_dim}: index with the towers it was trained against")
    url = normalize_url(out)
    fs, root = get_fs(url, **(storage_options or {}))
    b = _Build(plan, enc, enc_info, tw, spec, towers_fingerprint(tw, spec.reduce), fs, root, url, dev,
               int(batch_size), store_identity(ds.store), int(tw.embed_dim))
    for rid in plan.rids:
        b.metas[rid] = _window_meta(plan, rid)
        b.keys[rid] = part_key(plan, rid, b.metas[rid], enc_info["fingerprint"], b.towers_fp)
    mine = [plan.rids[i] for i in part_of(len(plan.rids), rank, world)]
    embedded, reused = _embed_parts(b, mine, progress)
    complete, missing = _finish(b)
    return {"url": url, "rank": rank, "world_size": world, "recordings": len(plan.rids),
            "windows": int(sum(len(p) for p in plan.positions.values())), "embedded": embedded, "reused": reused,
            "complete": complete, "missing": missing}


def _embed_parts(b: _Build, rids: list[str], progress: bool) -> tuple[int, int]:
    """Embed and write the parts of ``rids`` not already there; ``(embedded, reused)``."""
    from tqdm.auto import tqdm

    embedded = reused = 0
    for rid in tqdm(rids, desc="index", unit="rec", disable=not progress):
        key = b.keys[rid]
        if _read_record(b.fs, b.root, key, rid) is not None:
            reused += 1
            continue
        _write_part(b.fs, b.root, key, rid, b.plan.recording_fps[rid], _embed_recording(b, rid, b.metas[rid]))
        embedded += 1
    return embedded, reused


# -- reading ----------------------------------------------------------------------------------------------
def _check_manifest(m: Any, where: str) -> dict[str, Any]:
    """The manifest, checked field by field (MotionIndexError naming the field otherwise)."""
    if not isinstance(m, dict):
        raise MotionIndexError(f"{where}: expected a JSON object, found {type(m).__name__}")
    if m.get("format") != INDEX_FORMAT:
        raise MotionIndexError(f"{where}: field 'format' is {m.get('format')!r}, expected {INDEX_FORMAT!r}")
    if m.get("format_version") != INDEX_FORMAT_VERSION:
        raise MotionIndexError(f"{where}: field 'format_version' is {m.get('format_version')!r}; this version of "
                               f"imu2clip_plugin reads format_version {INDEX_FORMAT_VERSION} (rebuild the index)")
    for name, kind in (("parts", list), ("dim", int), ("vectors", list), ("towers", dict), ("windows", dict),
                       ("store", dict), ("encoder", dict)):
        if not isinstance(m.get(name), kind):
            raise MotionIndexError(f"{where}: field {name!r} is missing or not a {kind.__name__}")
    for i, e in enumerate(m["parts"]):
        need = ("recording_id", "file", "rows", "size", "sha256")
        if not isinstance(e, dict) or any(k not in e for k in need):
            raise MotionIndexError(f"{where}: field 'parts[{i}]' must hold {list(need)}")
        if not re.fullmatch(rf"{PARTS_DIR}/[0-9a-f]+\.parquet", str(e["file"])):
            raise MotionIndexError(f"{where}: field 'parts[{i}].file' is {e['file']!r}, not a part of this index")
    return m


def _check_part(t: pa.Table, e: dict[str, Any], where: str, dim: int, vectors: Sequence[str]) -> None:
    """A part's schema and rows against its manifest entry."""
    for c in META_COLUMNS:
        if c not in t.column_names:
            raise MotionIndexError(f"{where}: column {c!r} is missing")
    for v in vectors:
        col = VECTORS[v]
        typ = t.schema.field(col).type if col in t.column_names else None
        if typ is None or not pa.types.is_fixed_size_list(typ) or typ.list_size != dim \
                or typ.value_type != pa.float32():
            raise MotionIndexError(f"{where}: column {col!r} is {typ}, expected fixed_size_list<float32>[{dim}]")
    if t.num_rows != e["rows"]:
        raise MotionIndexError(f"{where}: field 'rows': the manifest says {e['rows']}, the part holds {t.num_rows}")
    rids = set(t["recording_id"].to_pylist())
    if rids - {e["recording_id"]}:
        raise MotionIndexError(f"{where}: column 'recording_id' holds {sorted(rids)[:3]}, the manifest says "
                               f"{e['recording_id']!r}")


def _vectors_of(col: pa.ChunkedArray, dim: int) -> np.ndarray:
    """A fixed-size-list column → ``(n, dim)`` float32 (null rows: zeros)."""
    arr = col.combine_chunks()
    if isinstance(arr, pa.ChunkedArray):   # an empty column
        arr = pa.concat_arrays(arr.chunks) if arr.num_chunks else pa.array([], pa.list_(pa.float32(), dim))
    flat = arr.values.slice(arr.offset * dim, len(arr) * dim)
    out = flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(arr), dim)
    if arr.null_count:   # Parquet keeps no values under a null row: they come back as nulls
        out[~arr.is_valid().to_numpy(zero_copy_only=False)] = 0.0
    return out


class MotionIndex:
    """A built motion index, checked and loaded (``MotionIndex.open(url)``): ``len``, the window table
    (:attr:`table`: recording_id, split, t0_ns, t1_ns, text, label; row ``i`` is window ``i``), the vectors
    (:meth:`vectors`: ``(N, D)`` float32, L2-normalised; null text rows are zeros) and :meth:`search`."""

    def __init__(self, url: str, manifest: dict[str, Any], fs: Any, root: str, verify: bool, device: str,
                 towers: Any = None):
        self.url, self.manifest, self.fs, self.root, self.verify = url, manifest, fs, root, verify
        self.device = device
        self._towers = towers
        self._vectors: dict[str, np.ndarray] = {}
        self._faiss: Any = None
        self.table: pa.Table = pa.table({})

    @classmethod
    def open(cls, url: str | os.PathLike, *, verify: bool = True, vectors: Sequence[str] = ("imu",),
             towers: Any = None, device: str = "cpu", storage_options: dict[str, Any] | None = None) -> "MotionIndex":
        """Open the index at ``url``: the manifest and each part are checked (``verify``: each part's sha256 too)
        and the window table and ``vectors`` loaded. ``towers``: the ClipTowers for text / image queries (default:
        rebuilt from the manifest on first use and checked against its fingerprint). Raises MotionIndexError."""
        url = normalize_url(url)
        fs, root = get_fs(url, **(storage_options or {}))
        where = join(url, MANIFEST_NAME)
        raw = _get(fs, join(root, MANIFEST_NAME))
        if raw is None:
            raise MotionIndexError(f"{where}: not found: {url} is not a motion index, or its build has not finished "
                                   "(imu2clip index build writes the manifest last)")
        try:
            manifest = _check_manifest(json.loads(raw), where)
        except json.JSONDecodeError as e:
            raise MotionIndexError(f"{where}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        unknown = sorted(set(vectors) - set(manifest["vectors"]))
        if unknown:
            raise MotionIndexError(f"{where}: field 'vectors' is {manifest['vectors']}; {unknown} not in this index")
        index = cls(url, manifest, fs, root, verify, device, towers)
        index._load(tuple(vectors), with_table=True)
        return index

    def _load(self, vectors: tuple[str, ...], with_table: bool = False) -> None:
        """Read every part (checked against the manifest), keeping ``vectors`` (and the window table)."""
        from mmloader.fsutil import read_arrow_buffer

        metas, vecs = [], {v: [] for v in vectors}
        for e in self.manifest["parts"]:
            where = join(self.url, e["file"])
            path = join(self.root, e["file"])
            try:
                buf = read_arrow_buffer(path, self.fs)
            except FileNotFoundError:
                raise MotionIndexError(f"{where}: part of recording {e['recording_id']!r} is missing") from None
            if buf.size != e["size"]:
                raise MotionIndexError(f"{where}: field 'size': the manifest says {e['size']} bytes, the file has "
                                       f"{buf.size} (truncated or replaced)")
            if self.verify and _sha256(buf) != e["sha256"]:
                rec = e["file"][:-len(".parquet")] + ".json"
                raise MotionIndexError(f"{where}: field 'sha256' does not match the manifest (the part is corrupt); "
                                       f"delete it and its record ({rec}) and run `imu2clip index build` again to "
                                       "embed that recording anew")
            try:
                t = pq.read_table(pa.BufferReader(buf))
            except (pa.ArrowInvalid, OSError) as err:
                raise MotionIndexError(f"{where}: not a readable Parquet part ({err})") from None
            _check_part(t, e, where, self.dim, vectors)
            metas.append(t.select(list(META_COLUMNS)))
            for v in vectors:
                vecs[v].append(_vectors_of(t[VECTORS[v]], self.dim))
        for v in vectors:
            self._vectors[v] = np.concatenate(vecs[v]) if vecs[v] else np.zeros((0, self.dim), np.float32)
        if with_table:
            self.table = pa.concat_tables(metas) if metas else pa.table({c: [] for c in META_COLUMNS})
            self.recording_ids = np.asarray(self.table["recording_id"].to_pylist(), dtype=object)
            self.t0_ns = self.table["t0_ns"].to_numpy()
            self.t1_ns = self.table["t1_ns"].to_numpy()

    # -- contents ------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """D, the size of every vector."""
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return self.table.num_rows

    def vectors(self, name: str = "imu") -> np.ndarray:
        """``(N, D)`` float32 vectors ``name`` (``imu``, and ``video`` / ``text`` when the index has them)."""
        if name not in self.manifest["vectors"]:
            raise KeyError(f"{self.url}: no {name!r} vectors in this index (it has {self.manifest['vectors']})")
        if name not in self._vectors:
            self._load((name,))
        return self._vectors[name]

    def window_at(self, recording_id: str, t_sec: float) -> int:
        """The window of ``recording_id`` containing ``t_sec`` (s, recording clock) whose start is nearest to it."""
        rows = np.flatnonzero(self.recording_ids == recording_id)
        if len(rows) == 0:
            raise ValueError(f"{self.url}: recording {recording_id!r} has no window in this index")
        t = int(round(float(t_sec) * NS))
        inside = rows[(self.t0_ns[rows] <= t) & (t < self.t1_ns[rows])]
        if len(inside) == 0:
            raise ValueError(f"{self.url}: no window of recording {recording_id!r} contains t={t_sec:g} s (its "
                             f"windows cover {self.t0_ns[rows].min() / NS:g}-{self.t1_ns[rows].max() / NS:g} s)")
        return int(inside[np.argmin(np.abs(self.t0_ns[inside] - t))])

    @property
    def towers(self) -> Any:
        """The index's CLIP towers (for text and image queries), rebuilt from the manifest and checked."""
        if self._towers is None:
            from .embed import towers_fingerprint

            rec = self.manifest["towers"]
            spec = TowerSpec(**{k: rec.get(k, getattr(TowerSpec, k)) for k in TowerSpec.__dataclass_fields__})
            tw = spec.build(self.device)
            fp = towers_fingerprint(tw, spec.reduce)
            if fp != rec.get("fingerprint"):
                raise MotionIndexError(
                    f"{join(self.url, MANIFEST_NAME)}: field 'towers.fingerprint' is {rec.get('fingerprint')!r}; the "
                    f"towers rebuilt from it ({spec}) give {fp!r} (weights or checkpoint file changed?); pass "
                    "MotionIndex.open(..., towers=ClipTowers(...)) to use others")
            self._towers = tw
        return self._towers

    def search(self, text: str | None = None, like: str | tuple[str, float] | None = None, image: Any = None,
               k: int = 10, split: str | Sequence[str] | None = None, recordings: Sequence[str] | None = None,
               faiss: bool = False) -> list[Any]:
        """The ``k`` best moments for one query (``imu2clip_plugin.search.search``): ``text`` (a string),
        ``like`` (``"REC_ID:T_SEC"`` or ``(rec_id, t_sec)``) or ``image`` (a file or an ``(H, W, 3)`` uint8 array)."""
        from .search import search

        return search(self, text=text, like=like, image=image, k=k, split=split, recordings=recordings, faiss=faiss)

    def faiss_index(self, cache: bool = True, target_recall: float | None = None) -> Any:
        """The FAISS index over the IMU vectors (``imu2clip_plugin.search.faiss_for``), cached beside the index."""
        from .search import faiss_for

        return faiss_for(self, cache=cache, target_recall=target_recall)

    def __repr__(self) -> str:
        return (f"MotionIndex({self.url!r}, windows={len(self)}, recordings={len(self.manifest['parts'])}, "
                f"dim={self.dim}, vectors={self.manifest['vectors']})")
