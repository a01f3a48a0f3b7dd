"""Reading Ego4D narrations (``v2/annotations/narration.json``) into an events table.

Layout: ``{video_uid: {"narration_pass_1": {"narrations": [...], "summaries": [...]}, "narration_pass_2": ...}}``;
either pass may be missing. Narrations are point events at ``timestamp_sec`` (canonical video time);
summaries span ``start_sec``..``end_sec``. ``text_raw`` keeps the source text; ``text`` resolves the tags.
Times must be finite seconds in ``[0, MAX_SECONDS]`` (NaN, Infinity, 1e300 and negatives are errors that name
the file, the entry and the field; under ``errors="skip"`` that event is dropped and counted).
"""

from __future__ import annotations

import math
import re
from typing import Any

from ...errors import SourceFormatError
from ...fsutil import read_json
from ..base import check_errors
from ..rows import event_row

PASSES = ("narration_pass_1", "narration_pass_2")

_PERSON_ROLE = re.compile(r"\b(man|woman|person|boy|girl|lady|child|kid)\s+[A-Z]\b")
_TAG = re.compile(r"#\s*(C|O|c|o|unsure|Unsure|summary|Summary)\b")
_LONE_LETTER = re.compile(r"\b([A-Z])\b")


def clean_narration(text: str) -> str:
    """Resolve Ego4D tags into plain English.

    ``#C C walks along the corridor`` → ``The person walks along the corridor``;
    ``#O man X waves at C`` → ``A man waves at the person``; ``#unsure`` / ``#summary`` are removed.
    """
    s = _TAG.sub(" ", text)
    s = _PERSON_ROLE.sub(lambda m: f"a {m.group(1)}", s)
    s = re.sub(r"\bC\b", "the person", s)
    s = _LONE_LETTER.sub("someone", s)
    s = re.sub(r"\s+", " ", s).strip(" .")
    return s[:1].upper() + s[1:] if s else s


MAX_SECONDS = 1_000_000.0  # ~11.6 days: longer than any capture; a time beyond it is absurd, not data
MAX_PROBLEMS = 20  # problems listed per video in the prepare report (all are counted)


def check_seconds(v: Any, key: str, where: str, path: str, *, lo: float = 0.0, hi: float = MAX_SECONDS,
                  lo_open: bool = False) -> float:
    """``v`` as float seconds, or SourceFormatError naming ``path``, ``where`` and the field ``key``.

    Refused: non-numbers (and booleans), NaN and ±Infinity (Python's json reads them), and values outside
    ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``): a negative time or 1e300 s is a broken file, not a time.
    """
    expected = f"a number of seconds, finite, {'>' if lo_open else '>='} {lo:g} and <= {hi:g}"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SourceFormatError(path, f"{where}: field '{key}' is {v!r}", expected)
    try:
        f = float(v)
    except OverflowError:  # an integer too large for a float
        raise SourceFormatError(path, f"{where}: field '{key}' is {v!r}", expected) from None
    if not math.isfinite(f) or f > hi or f < lo or (lo_open and f == lo):
        raise SourceFormatError(path, f"{where}: field '{key}' is {v!r}", expected)
    return f


def _number(obj: dict, key: str, where: str, path: str) -> float:
    return check_seconds(obj.get(key), key, where, path)


def _text(obj: dict, key: str, where: str, path: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise SourceFormatError(path, f"{where}: field '{key}' is {v!r}", "a string")
    return v


def read_narrations(path: str) -> dict[str, list[dict[str, Any]]]:
    """Parse narration.json into event rows grouped by video_uid (times in ns).

    Raises SourceFormatError naming the file, the video, the pass, the entry and the field on any
    structural problem or absurd number (see ``parse_narrations``).
    """
    return parse_narrations(path)[0]


def parse_narrations(path: str, *, errors: str = "raise") -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
    """Parse narration.json: ``(rows by video_uid, dropped by video_uid)``.

    Every time must be a finite number of seconds in ``[0, MAX_SECONDS]`` and a summary's ``end_sec`` at least
    its ``start_sec``. ``errors="raise"``: the first problem raises SourceFormatError naming the file, the
    video, the pass, the entry and the field. ``errors="skip"``: the bad event (or a video's malformed pass)
    is dropped, and ``dropped[uid] = {"events": n, "problems": [...]}`` says which and why (the first
    ``MAX_PROBLEMS`` messages; all are counted). A top level that is not an object always raises.
    """
    check_errors(errors)
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise SourceFormatError(path, f"top level is a {type(doc).__name__}", "an object keyed by video_uid")
    out: dict[str, list[dict[str, Any]]] = {}
    dropped: dict[str, dict[str, Any]] = {}

    def drop(uid: str, e: SourceFormatError, n: int = 1) -> None:
        if errors == "raise":
            raise e
        d = dropped.setdefault(uid, {"events": 0, "problems": []})
        d["events"] += n
        if len(d["problems"]) < MAX_PROBLEMS:
            d["problems"].append(f"{e.problem}" + (f" (expected {e.expected})" if e.expected else ""))

    for uid, entry in doc.items():
        if not isinstance(entry, dict):
            drop(uid, SourceFormatError(path, f"video {uid}: entry is a {type(entry).__name__}", "an object"))
            continue
        rows: list[dict[str, Any]] = []
        for pass_name in PASSES:
            if pass_name not in entry:
                continue
            block = entry[pass_name]
            if not isinstance(block, dict):
                drop(uid, SourceFormatError(path, f"video {uid}: '{pass_name}' is a {type(block).__name__}",
                                            "an object"))
                continue
            for key, kind in (("narrations", "narration"), ("summaries", "summary")):
                items = block.get(key, [])
                if not isinstance(items, list):
                    drop(uid, SourceFormatError(path, f"video {uid} {pass_name}: '{key}' is not a list", "a list"))
                    continue
                for i, item in enumerate(items):
                    where = f"video {uid} {pass_name} {key}[{i}]"
                    try:
                        rows.append(_event_row(path, uid, pass_name, key, kind, i, item, where))
                    except SourceFormatError as e:
                        drop(uid, e)
        out[uid] = sorted(rows, key=lambda r: (r["t_start_ns"], r["source"]))
    return out, dropped


def _event_row(path: str, uid: str, pass_name: str, key: str, kind: str, i: int, item: Any,
               where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise SourceFormatError(path, f"{where}: entry is a {type(item).__name__}", "an object")
    if kind == "narration":
        t0 = t1 = _number(item, "timestamp_sec", where, path)
        raw = _text(item, "narration_text", where, path)
    else:
        t0 = _number(item, "start_sec", where, path)
        t1 = _number(item, "end_sec", where, path)
        raw = _text(item, "summary_text", where, path)
        if t1 < t0:
            raise SourceFormatError(path, f"{where}: end_sec {t1} < start_sec {t0}", "end >= start")
    return event_row(uid, round(t0 * 1e9), round(t1 * 1e9), clean_narration(raw), text_raw=raw, kind=kind,
                     source=pass_name, uid=str(item.get("annotation_uid") or f"{uid}:{pass_name}:{key}:{i}"),
                     unsure="#unsure" in raw.lower())
