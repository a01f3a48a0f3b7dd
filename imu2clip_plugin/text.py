"""Window text: the one string a window's narrations are embedded as, and labels read from it.

A window's ``text`` is None, one narration, or (in tile mode) a list of the narrations it covers.
"""

from __future__ import annotations

from typing import Any, Callable


def text_of(t: Any) -> str:
    """The one string a window's ``text`` is embedded as (narrations joined with ". "), in training, in the
    embedding cache and in evaluation alike."""
    if t is None:
        return ""
    if isinstance(t, (list, tuple)):
        return ". ".join(str(x) for x in t)
    return str(t)


def verb_labeller(mapping: dict[str, str]) -> Callable[[str], str | None]:
    """A window-text → class function for datasets without activity labels (e.g. Ego4D narrations): the class of
    the first word of the text that starts with one of ``mapping``'s keys (``{"walk": "walking", "cut": "cooking"}``
    matches "C walks ..." and "C cuts ..."), or None. Longer keys win over their prefixes."""
    keys = sorted(((k.lower(), v) for k, v in mapping.items()), key=lambda kv: -len(kv[0]))
    if not keys:
        raise ValueError("the verb → class mapping is empty")

    def label(text: str) -> str | None:
        for word in text.lower().replace("#", " ").split():
            for k, v in keys:
                if word.startswith(k):
                    return v
        return None

    return label
