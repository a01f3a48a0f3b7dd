"""Reading Ego4D narrations (``v2/annotations/narration.json``) into an events table.

Layout: ``{video_uid: {"narration_pass_1": {"narrations": [...], "summaries": [...]}, "narration_pass_2": ...}}``;
either pass may be missing. Narrations are point events at ``timestamp_sec`` (canonical video time);
summaries span ``start_sec``..``end_sec``. ``text_raw`` keeps the source text; ``text`` resolves the tags.
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa

from ..errors import SourceFormatError
from ..fsutil import read_json

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


def _number(obj: dict, key: str, where: str, path: str) -> float:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SourceFormatError(path, f"{where}: field '{key}' is {v!r}", "a number of seconds")
    return float(v)


def _text(obj: dict, key: str, where: str, path: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise SourceFormatError(path, f"{where}: field '{key}' is {v!r}", "a string")
    return v


def read_narrations(path: str) -> dict[str, list[dict[str, Any]]]:
    """Parse narration.json into event rows grouped by video_uid (times in ns).

    Raises SourceFormatError naming the file, the video, the pass, the entry and the field on any
    structural problem.
    """
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise SourceFormatError(path, f"top level is a {type(doc).__name__}", "an object keyed by video_uid")
    out: dict[str, list[dict[str, Any]]] = {}
    for uid, entry in doc.items():
        if not isinstance(entry, dict):
            raise SourceFormatError(path, f"video {uid}: entry is a {type(entry).__name__}", "an object")
        rows: list[dict[str, Any]] = []
        for pass_name in PASSES:
            if pass_name not in entry:
                continue
            block = entry[pass_name]
            if not isinstance(block, dict):
                raise SourceFormatError(path, f"video {uid}: '{pass_name}' is a {type(block).__name__}", "an object")
            for key, kind in (("narrations", "narration"), ("summaries", "summary")):
                items = block.get(key, [])
                if not isinstance(items, list):
                    raise SourceFormatError(path, f"video {uid} {pass_name}: '{key}' is not a list", "a list")
                for i, item in enumerate(items):
                    where = f"video {uid} {pass_name} {key}[{i}]"
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
                    rows.append(
                        {
                            "recording_id": uid,
                            "t_start_ns": round(t0 * 1e9),
                            "t_end_ns": round(t1 * 1e9),
                            "text": clean_narration(raw),
                            "text_raw": raw,
                            "kind": kind,
                            "source": pass_name,
                            "uid": str(item.get("annotation_uid") or f"{uid}:{pass_name}:{key}:{i}"),
                            "unsure": "#unsure" in raw.lower(),
                        }
                    )
        out[uid] = sorted(rows, key=lambda r: (r["t_start_ns"], r["source"]))
    return out
