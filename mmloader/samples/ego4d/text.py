"""Narrations: point narrations and summaries per annotator pass, phrased per activity."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .plan import Segment, VideoPlan, uuid4

__all__ = ["narration_entry"]

# Two annotators (pass 1, pass 2) with their own phrasings.
_PHRASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "walking": (("walks along the corridor", "walks down the hallway", "strolls through the room"),
                ("walks forward in the corridor", "moves along the hallway", "walks past a door")),
    "running": (("runs on the track", "jogs along the track", "runs forward"),
                ("sprints along the running track", "jogs on the field", "runs past the trees")),
    "sitting down": (("sits down at the desk", "sits on the chair", "looks at the desk"),
                     ("takes a seat at the table", "settles on a chair", "looks down at the table")),
    "standing up": (("stands up from the chair", "gets up", "stands in the room"),
                    ("rises from the seat", "stands up", "stands near the sofa")),
    "looking around": (("looks around the room", "turns the head to the left", "looks at the wall"),
                       ("looks around", "turns around in the room", "glances at the pictures")),
    "cycling": (("rides the bicycle on the road", "cycles along the street", "pedals the bicycle"),
                ("rides a bike down the road", "cycles past the buildings", "steers the bicycle")),
    "climbing stairs": (("climbs the stairs", "walks up the staircase", "holds the handrail"),
                        ("goes up the stairs", "steps up the stairs", "climbs up the steps")),
}
_SUMMARY: dict[str, tuple[str, str]] = {
    "walking": ("walked along a corridor", "was walking in a hallway"),
    "running": ("ran on a track", "was jogging on a running track"),
    "sitting down": ("sat down at a desk", "took a seat at a table"),
    "standing up": ("stood up in a room", "got up from a chair"),
    "looking around": ("looked around a room", "was looking around a decorated room"),
    "cycling": ("cycled on a road", "was riding a bicycle in the street"),
    "climbing stairs": ("climbed a staircase", "was going up the stairs"),
}
_OTHERS = ("#O man X waves at C", "#O woman Y walks past C", "#O person X talks to C", "#O man Y points at the wall")


def _narration_text(activity: str, annotator: int, rng: np.random.Generator) -> str:
    """``#C C <phrase>`` (sometimes with `` #unsure``) or, rarely, an ``#O`` narration."""
    if rng.uniform() < 0.1:
        return str(rng.choice(_OTHERS))
    text = "#C C " + str(rng.choice(_PHRASES[activity][annotator]))
    return text + " #unsure" if rng.uniform() < 0.08 else text


def _narrations(segments: Sequence[Segment], annotator: int, fps: float,
                rng: np.random.Generator) -> list[dict[str, Any]]:
    """Point narrations every 2-5 s, each strictly inside (≥ 0.3 s from the ends of) its segment."""
    out = []
    for seg in segments:
        t = seg.start_sec + float(rng.uniform(0.3, 1.5))
        while t < seg.end_sec - 0.3:
            ts = round(t, 4)
            out.append({"timestamp_sec": ts, "timestamp_frame": int(round(ts * fps)),
                        "narration_text": _narration_text(seg.activity, annotator, rng),
                        "annotation_uid": uuid4(rng)})
            t += float(rng.uniform(2.0, 5.0))
    return out


def _summaries(segments: Sequence[Segment], annotator: int, fps: float, duration: float,
               rng: np.random.Generator) -> list[dict[str, Any]]:
    """One summary over the whole video, or two (split at the middle segment boundary) for >= 30 s."""
    groups = [list(segments)]
    if duration >= 30.0 and len(segments) >= 2:
        cut = len(segments) // 2
        groups = [list(segments[:cut]), list(segments[cut:])]
    out = []
    for g in groups:
        acts = [_SUMMARY[s.activity][annotator] for s in g]
        text = "#summary C " + (acts[0] if len(acts) == 1 else ", then ".join(acts[:-1]) + " and then " + acts[-1])
        start, end = g[0].start_sec, g[-1].end_sec
        out.append({"start_sec": start, "end_sec": end, "start_frame": int(round(start * fps)),
                    "end_frame": int(round(end * fps)), "summary_text": text, "annotation_uid": uuid4(rng)})
    return out


def narration_entry(plan: VideoPlan, fps: float, duration: float, rng: np.random.Generator) -> dict[str, Any]:
    """One video's narration.json entry with the passes chosen in the plan."""
    entry: dict[str, Any] = {"status": "complete"}
    for annotator, name in enumerate(("narration_pass_1", "narration_pass_2")):
        pass_rng = np.random.default_rng(rng.integers(2**63))
        if name in plan.narration_passes:
            entry[name] = {"narrations": _narrations(plan.segments, annotator, fps, pass_rng),
                           "summaries": _summaries(plan.segments, annotator, fps, duration, pass_rng)}
    return entry
