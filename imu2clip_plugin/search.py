"""Search over a motion index: a text, an image or a moment of a recording → the best-matching moments.

The query becomes one L2-normalised vector in the CLIP space: ``text`` through the index's CLIP text tower,
``image`` through its image tower (text→IMU and image→IMU search, the cross-modal directions the encoder was
trained for), ``like=(recording, t)`` is the IMU vector of the window of that recording containing ``t`` (the one
whose start is nearest to it), so IMU→IMU. Each window's score is the cosine between the query and the window's IMU
vector. Windows are taken in descending score (ties by window index) and merged into **moments**: a window that
overlaps or touches a moment of its recording joins it (the span becomes the union, the score stays the best; a
window that bridges two moments merges them), any other window starts a new moment, and the search stops at the
first window that would start moment ``k + 1``. So ``k`` is a number of moments, and a moment's span is the union of
its windows among the hits ranked above that window. Filters (``split``, ``recordings``) restrict the windows
searched.

Exact search (the default) scores every candidate window with batched float32 matrix products and takes the top
windows with ``argpartition``. ``faiss=True`` uses an IVF-Flat FAISS index over the IMU vectors (:class:`FaissIVF`):
``nlist ≈ √N`` k-means lists, and ``nprobe`` calibrated when it is built, as the smallest value whose recall@10
against exact search reaches ``target_recall`` (0.97) on a sample of the index's own vectors used as queries (their
neighbours other than themselves). It is built on first use and cached beside the index (``faiss/``, checked by
sha256 on load). On clustered embeddings a small ``nprobe`` reaches the target; on unstructured vectors the
calibration has to probe most lists, and exact search is as fast (``docs/search.md``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    from .motion_index import MotionIndex

__all__ = ["Moment", "FaissIVF", "search", "query_vector", "merge_moments", "exact_scores", "exact_topk",
           "recall_at_k", "faiss_for", "faiss_recall", "format_moments", "parse_like", "import_faiss",
           "TARGET_RECALL"]

TARGET_RECALL = 0.97        # FaissIVF calibration target (recall@10 on the index's own vectors, self excluded)
CALIBRATION_QUERIES = 200   # queries sampled from the index to calibrate nprobe
SCORE_BATCH = 1 << 16       # rows per matrix product in exact search
NS = 1_000_000_000
FAISS_DIR = "faiss"
FAISS_CACHE_VERSION = 1


@dataclass(frozen=True)
class Moment:
    """One search result: ``[t0, t1)`` seconds of ``recording_id`` (recording clock), ``score`` (the best cosine of
    its windows), ``windows`` (the index rows merged into it, best first) and ``best`` (the best window's row);
    ``split``, ``text`` and ``label`` are the best window's."""

    recording_id: str
    t0: float
    t1: float
    score: float
    windows: tuple[int, ...]
    best: int
    split: str | None
    text: str | None
    label: str | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["windows"] = list(self.windows)
        return d


# -- the query --------------------------------------------------------------------------------------------
def parse_like(value: str | tuple[str, float]) -> tuple[str, float]:
    """``"REC_ID:T_SEC"`` (the last colon splits) or ``(rec_id, t_sec)`` → ``(rec_id, t_sec)``."""
    if isinstance(value, (tuple, list)):
        rid, t = value
        return str(rid), float(t)
    rid, sep, t = str(value).rpartition(":")
    try:
        if not sep or not rid:
            raise ValueError
        return rid, float(t)
    except ValueError:
        raise ValueError(f"like: expected REC_ID:T_SEC (e.g. 'rec-1:12.5'), got {value!r}") from None


def _image_tensor(image: Any):
    """A file path, an ``(H, W, 3)`` uint8 array or a ``(3, H, W)`` uint8 tensor → ``(1, 3, H, W)`` uint8."""
    import torch

    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        with Image.open(image) as im:
            image = np.asarray(im.convert("RGB"))
    t = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image
    if t.ndim == 3 and t.shape[-1] == 3 and t.shape[0] != 3:
        t = t.permute(2, 0, 1)
    if t.ndim != 3 or t.shape[0] != 3 or t.dtype != torch.uint8:
        raise ValueError(f"image: expected an RGB image (H, W, 3) uint8, got {t.dtype} {tuple(t.shape)}")
    return t.unsqueeze(0).contiguous()


def query_vector(index: "MotionIndex", text: str | None = None, like: Any = None,
                 image: Any = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The query's unit vector ``(D,)`` float32 and its description (exactly one of ``text``, ``like``, ``image``)."""
    given = [name for name, v in (("text", text), ("like", like), ("image", image)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one query of text=, like=, image= (got {given or 'none'})")
    if text is not None:
        q = index.towers.encode_text([text])[0].float().cpu().numpy()
        info: dict[str, Any] = {"text": text}
    elif image is not None:
        q = index.towers.encode_images(_image_tensor(image).to(index.towers.device))[0].float().cpu().numpy()
        info = {"image": str(image) if isinstance(image, (str, os.PathLike)) else "array"}
    else:
        rid, t = parse_like(like)
        row = index.window_at(rid, t)
        q = index.vectors("imu")[row]
        info = {"like": f"{rid}:{t:g}", "window": row}
    q = np.asarray(q, dtype=np.float32)
    return q / max(float(np.linalg.norm(q)), 1e-12), info


def candidates(index: "MotionIndex", split: str | Sequence[str] | None = None,
               recordings: Sequence[str] | None = None) -> np.ndarray | None:
    """The rows a filter keeps (int64, ascending), None for every row. Unknown recordings: ValueError."""
    if split is None and recordings is None:
        return None
    keep = np.ones(len(index), dtype=bool)
    if split is not None:
        splits = [split] if isinstance(split, str) else list(split)
        keep &= np.isin(np.asarray(index.table["split"].to_pylist(), dtype=object), splits)
    if recordings is not None:
        recs = [recordings] if isinstance(recordings, str) else list(recordings)
        unknown = sorted(set(recs) - set(index.recording_ids.tolist()))
        if unknown:
            raise ValueError(f"recordings: {unknown[:5]} have no window in the index {index.url}")
        keep &= np.isin(index.recording_ids, recs)
    return np.flatnonzero(keep)


# -- merging windows into moments -------------------------------------------------------------------------
def merge_moments(index: "MotionIndex", rows: Sequence[int], scores: Sequence[float],
                  k: int) -> tuple[list[Moment], bool]:
    """Windows ``rows`` (descending ``scores``) → up to ``k`` moments (module docstring); the flag says whether a
    window that would start moment ``k + 1`` was reached (else more windows may still join)."""
    moments: list[dict[str, Any]] = []
    open_by_rec: dict[str, list[dict[str, Any]]] = {}
    alive, stopped = 0, False
    for r, s in zip(rows, scores):
        r = int(r)
        rid, a, b = index.recording_ids[r], int(index.t0_ns[r]), int(index.t1_ns[r])
        mine = open_by_rec.setdefault(rid, [])
        hit = [m for m in mine if m["lo"] <= b and a <= m["hi"]]
        if not hit:
            if alive >= k:
                stopped = True
                break
            m = {"lo": a, "hi": b, "score": float(s), "best": r, "windows": [r]}
            mine.append(m)
            moments.append(m)
            alive += 1
            continue
        head = hit[0]   # the earliest, so the best-scoring: absorbs the window and any other moment it bridges
        head["lo"], head["hi"] = min(head["lo"], a), max(head["hi"], b)
        head["windows"].append(r)
        for other in hit[1:]:
            head["lo"], head["hi"] = min(head["lo"], other["lo"]), max(head["hi"], other["hi"])
            head["windows"].extend(other["windows"])
            mine.remove(other)
            moments.remove(other)
            alive -= 1
    return [_moment(index, m) for m in moments], stopped


def _moment(index: "MotionIndex", m: dict[str, Any]) -> Moment:
    best = m["best"]
    row = {c: index.table[c][best].as_py() for c in ("split", "text", "label")}
    return Moment(str(index.recording_ids[best]), m["lo"] / NS, m["hi"] / NS, m["score"], tuple(m["windows"]), best,
                  row["split"], row["text"], row["label"])


# -- exact search -----------------------------------------------------------------------------------------
def exact_scores(vectors: np.ndarray, queries: np.ndarray, batch_rows: int = SCORE_BATCH) -> np.ndarray:
    """``queries @ vectors.T`` (``(Q, N)`` float32, or ``(N,)`` for one query), ``batch_rows`` rows at a time."""
    q = np.asarray(queries, dtype=np.float32)
    single = q.ndim == 1
    q = q[None] if single else q
    out = np.empty((q.shape[0], len(vectors)), dtype=np.float32)
    for a in range(0, len(vectors), batch_rows):
        out[:, a:a + batch_rows] = q @ vectors[a:a + batch_rows].T
    return out[0] if single else out


def _top(scores: np.ndarray, m: int) -> np.ndarray:
    """Positions of the ``m`` highest ``scores``, best first (ties: lower position first)."""
    m = min(m, len(scores))
    pos = np.arange(len(scores)) if m == len(scores) else np.argpartition(-scores, m - 1)[:m]
    return pos[np.lexsort((pos, -scores[pos]))]


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """``(Q, k)`` rows of the ``k`` nearest vectors (inner product) of each query, best first."""
    s = exact_scores(vectors, queries)
    s = s[None] if s.ndim == 1 else s
    return np.stack([_top(row, k) for row in s])


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of ``|found ∩ truth| / |truth|`` (rows of ids; ``-1`` in ``found`` never matches)."""
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


# -- the search --------------------------------------------------------------------------------------------
def _exact_ranker(index: "MotionIndex", q: np.ndarray, rows: np.ndarray | None) -> Callable:
    full = exact_scores(index.vectors("imu"), q)
    s = full if rows is None else full[rows]

    def ranked(m: int) -> tuple[np.ndarray, np.ndarray]:
        pos = _top(s, m)
        return (pos if rows is None else rows[pos]), s[pos]

    return ranked


def _faiss_ranker(index: "MotionIndex", q: np.ndarray, rows: np.ndarray | None) -> Callable:
    fi = index.faiss_index()

    def ranked(m: int) -> tuple[np.ndarray, np.ndarray]:
        d, i = fi.search(q[None], m, ids=rows)
        ok = i[0] >= 0
        return i[0][ok], d[0][ok]

    return ranked


def search(index: "MotionIndex", text: str | None = None, like: Any = None, image: Any = None, k: int = 10,
           split: str | Sequence[str] | None = None, recordings: Sequence[str] | None = None,
           faiss: bool = False) -> list[Moment]:
    """The ``k`` best moments of ``index`` for one query, best first (module docstring)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    q, _ = query_vector(index, text=text, like=like, image=image)
    rows = candidates(index, split, recordings)
    n = len(index) if rows is None else len(rows)
    if n == 0:
        return []
    ranked = (_faiss_ranker if faiss else _exact_ranker)(index, q, rows)
    m = min(n, max(8 * k, 64))
    while True:
        found, scores = ranked(m)
        moments, stopped = merge_moments(index, found, scores, k)
        if stopped or m >= n:
            return moments
        m = min(n, 4 * m)


# -- FAISS --------------------------------------------------------------------------------------------------
def import_faiss():
    """The ``faiss`` module, or ImportError saying how to install it."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError("FAISS search (--faiss / faiss=True) needs the faiss-cpu package, which is not installed: "
                          "pip install faiss-cpu (or the extra: pip install 'mmloader[search]'); exact search, the "
                          "default, needs nothing more") from e
    return faiss


def _nprobe_grid(nlist: int) -> list[int]:
    """Candidate ``nprobe`` values, ascending, ending at ``nlist`` (an exhaustive, exact scan)."""
    grid = {min(nlist, 2 ** i) for i in range(int(math.log2(max(nlist, 1))) + 1)}
    grid |= {max(1, int(round(nlist * f / 16))) for f in range(1, 17)}
    return sorted(g for g in grid if 1 <= g <= nlist)


class FaissIVF:
    """An IVF-Flat FAISS index (inner product) over ``(N, D)`` unit vectors with a calibrated ``nprobe``."""

    def __init__(self, index: Any, nlist: int, nprobe: int, calibration: dict[str, Any]):
        self.index, self.nlist, self.nprobe, self.calibration = index, nlist, nprobe, calibration
        self.index.nprobe = nprobe

    @classmethod
    def build(cls, vectors: np.ndarray, target_recall: float = TARGET_RECALL, queries: int = CALIBRATION_QUERIES,
              seed: int = 0, k: int = 10) -> "FaissIVF":
        """Train ``nlist ≈ √N`` lists (k-means on at most 256 points per list), add every vector, then pick the
        smallest ``nprobe`` whose recall@``k`` on ``queries`` of the vectors (their neighbours other than
        themselves) reaches ``target_recall`` (``nprobe = nlist`` is exact, so one always does)."""
        faiss = import_faiss()
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        n, d = x.shape
        nlist = max(1, min(int(round(math.sqrt(n))), n // 39))
        rng = np.random.default_rng(seed)
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        train = x if n <= 256 * nlist else x[np.sort(rng.choice(n, 256 * nlist, replace=False))]
        ivf.train(train)
        ivf.add(x)
        sample = np.sort(rng.choice(n, min(queries, n), replace=False))
        kk = min(k + 1, n)
        truth = _without_self(exact_topk(x, x[sample], kk), sample, kk - 1)

        def recall_at(p: int) -> float:
            ivf.nprobe = p
            return recall_at_k(_without_self(ivf.search(x[sample], kk)[1], sample, kk - 1), truth) if kk > 1 else 1.0

        grid = _nprobe_grid(nlist)
        lo, hi, recall = 0, len(grid) - 1, 1.0   # grid[-1] = nlist scans every list: exact
        while lo < hi:                            # the smallest grid value reaching the target (recall grows with it)
            mid = (lo + hi) // 2
            r = recall_at(grid[mid])
            if r >= target_recall:
                hi, recall = mid, r
            else:
                lo = mid + 1
        return cls(ivf, nlist, grid[hi], {"target_recall": target_recall, "recall": recall, "queries": len(sample),
                                          "k": k, "n": n})

    def search(self, queries: np.ndarray, k: int, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)``, each ``(Q, k)``, best first (``-1`` rows where fewer than ``k`` were found);
        ``ids`` restricts the search to those rows."""
        faiss = import_faiss()
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if ids is None:
            return self.index.search(q, int(k))
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
        params = faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe)
        return self.index.search(q, int(k), params=params)

    def to_bytes(self) -> bytes:
        return import_faiss().serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, info: dict[str, Any]) -> "FaissIVF":
        index = import_faiss().deserialize_index(np.frombuffer(data, dtype=np.uint8))
        return cls(index, int(info["nlist"]), int(info["nprobe"]), dict(info["calibration"]))

    def info(self) -> dict[str, Any]:
        return {"kind": "IVF-Flat", "nlist": self.nlist, "nprobe": self.nprobe, "calibration": self.calibration}


def _without_self(rows: np.ndarray, selves: np.ndarray, k: int) -> np.ndarray:
    """Each row's first ``k`` ids other than its query's own id (``-1`` padded)."""
    out = np.full((len(rows), k), -1, dtype=np.int64)
    for i, (r, me) in enumerate(zip(rows, selves)):
        keep = [x for x in r.tolist() if x != me][:k]
        out[i, :len(keep)] = keep
    return out


def faiss_for(index: "MotionIndex", cache: bool = True, target_recall: float | None = None) -> FaissIVF:
    """The index's :class:`FaissIVF`: from memory, from ``INDEX/faiss/`` (checked by sha256), or built (and written
    there when ``cache``; a cache that cannot be written is reported, and the index kept in memory)."""
    from mmloader.fsutil import join
    from mmloader.windows.protocol import sha256_json

    from .motion_index import _get, _put, _sha256

    target = TARGET_RECALL if target_recall is None else float(target_recall)
    if index._faiss is not None and index._faiss.calibration["target_recall"] == target:
        return index._faiss
    digest = sha256_json({"v": FAISS_CACHE_VERSION, "parts": [e["sha256"] for e in index.manifest["parts"]],
                          "target": target})[:16]
    base = join(index.root, FAISS_DIR, f"ivf-{digest}")
    fi = None
    raw, meta = _get(index.fs, base + ".faiss"), _get(index.fs, base + ".json")
    if raw is not None and meta is not None:
        info = json.loads(meta)
        if info.get("sha256") == _sha256(raw) and info.get("size") == len(raw):
            fi = FaissIVF.from_bytes(raw, info)
        else:
            warnings.warn(f"{join(index.url, FAISS_DIR, f'ivf-{digest}.faiss')}: sha256 differs from its record; "
                          "rebuilding the FAISS index", stacklevel=2)
    if fi is None:
        fi = FaissIVF.build(index.vectors("imu"), target_recall=target)
        if cache:
            data = fi.to_bytes()
            try:
                _put(index.fs, base + ".faiss", data)
                _put(index.fs, base + ".json", json.dumps({**fi.info(), "size": len(data),
                                                           "sha256": _sha256(data)}).encode())
            except OSError as e:
                warnings.warn(f"{index.url}: could not cache the FAISS index beside the index ({e}); it is kept in "
                              "memory only", stacklevel=2)
    index._faiss = fi
    return fi


def faiss_recall(index: "MotionIndex", queries: int = 100, k: int = 10, seed: int = 1) -> dict[str, Any]:
    """Recall@``k`` of the index's FAISS search against exact search, on ``queries`` windows of the index used as
    queries (window-level, no merging, no filters), with the FAISS index's settings."""
    fi = index.faiss_index()
    v = index.vectors("imu")
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(v), min(queries, len(v)), replace=False))
    kk = min(k, len(v))
    recall = recall_at_k(fi.search(v[sample], kk)[1], exact_topk(v, v[sample], kk))
    return {"recall_at_k": recall, "k": kk, "queries": len(sample), **fi.info()}


# -- output -------------------------------------------------------------------------------------------------
def format_moments(moments: Sequence[Moment], text_width: int = 48) -> str:
    """The moments as a text table (rank, recording, t0, t1, score, windows, split, label, text)."""
    head = f"{'#':>3}  {'recording':<36}  {'t0 (s)':>8}  {'t1 (s)':>8}  {'score':>7}  {'win':>3}  {'split':<6}  " \
           f"{'label':<16}  text"
    lines = [head]
    for i, m in enumerate(moments, 1):
        text = (m.text or "").replace("\n", " ")
        text = text if len(text) <= text_width else text[:text_width - 1] + "…"
        lines.append(f"{i:>3}  {m.recording_id:<36}  {m.t0:>8.2f}  {m.t1:>8.2f}  {m.score:>7.4f}  "
                     f"{len(m.windows):>3}  {str(m.split or '-'):<6}  {str(m.label or '-'):<16}  {text}")
    return "\n".join(lines)
