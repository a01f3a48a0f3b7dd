"""The prepare loop every recipe shares: source recordings → one store, with a report.

A recipe reads its source layout, then hands ``Prepare.run`` the recordings it found and a function that turns
one of them into ``RecordingRows`` (parsing and repair: the recipe's own code). ``run`` does the rest:

- iterates the recordings (with a progress bar), each inside one ``StoreWriter`` (atomic: a failure leaves
  nothing at ``dst``);
- ``errors="raise"``: the first ``SourceFormatError`` aborts; ``errors="skip"``: that recording is left out and
  listed under ``failed`` with the message; ``SkipRecording`` leaves one out under ``skipped`` in either mode;
- refuses a store with no recording (the recipe's own error);
- writes the ``recordings``, ``streams``, ``gaps`` and events tables, and ``reports/prepare.json`` with
  ``recordings`` (each recording's report entry), ``skipped``, ``failed`` and ``totals``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, TypeVar

from tqdm.auto import tqdm

from ..errors import SourceFormatError
from ..store.writer import StoreWriter
from .rows import RecordingRows, StoreRows

T = TypeVar("T")
ERRORS = ("raise", "skip")
REPORT = "reports/prepare.json"  # the prepare report, inside the store


class SkipRecording(Exception):
    """Raised by a recipe for a recording it leaves out on purpose (e.g. nothing downloaded): listed under
    ``skipped`` with this message, under either ``errors`` mode."""


def check_errors(errors: str) -> None:
    """ValueError unless ``errors`` is ``"raise"`` or ``"skip"``."""
    if errors not in ERRORS:
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")


def source_digest(tag: str, lines: Iterable[str]) -> str:
    """A 32-hex-digit fingerprint of a source: ``tag`` (recipe and version), then one line per file (name, size,
    mtime...: whatever changes when the file does), in the order given."""
    h = hashlib.sha256(tag.encode())
    for line in lines:
        h.update(f"{line}\n".encode())
    return h.hexdigest()[:32]


def summarize_failed(failed: dict[str, str]) -> str:
    """``"<id>: <why>"`` of the first failed recording, and how many more failed."""
    rid, why = next(iter(failed.items()))
    return f"{rid}: {why}" + (f"; and {len(failed) - 1} more" if len(failed) > 1 else "")


def count_totals(report: dict[str, Any]) -> dict[str, int]:
    """The totals every prepare report has: recordings written, skipped and failed."""
    return {"recordings": len(report["recordings"]), "skipped": len(report["skipped"]),
            "failed": len(report["failed"])}


def sum_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Counts by reason (``{"duplicate_timestamp": 3, ...}``) summed over recordings."""
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


@dataclass
class Prepare:
    """One prepare run of a recipe (see the module docstring).

    ``root``: the source as given (the destination may not be, or contain, it). ``report``: the report's
    first fields (dataset, source...; ``skipped``/``failed`` found while reading the layout). ``event_names``:
    the order of the first events tables. ``unit``: what the progress bar counts.
    """

    dataset: str
    root: str
    dst: str
    fingerprint: str
    options: dict[str, Any]
    errors: str = "raise"
    overwrite: bool = False
    progress: bool = True
    storage_options: dict[str, Any] | None = None
    report: dict[str, Any] = field(default_factory=dict)
    event_names: Sequence[str] = ()
    unit: str = "recording"

    def __post_init__(self) -> None:
        check_errors(self.errors)
        self.report = dict(self.report)
        for key in ("recordings", "skipped", "failed"):
            self.report[key] = dict(self.report.get(key) or {})

    def run(self, items: Sequence[tuple[str, T]], build: Callable[[StoreWriter, T], RecordingRows], *,
            totals: Callable[[dict[str, Any]], dict[str, Any]],
            nothing_prepared: Callable[[dict[str, Any]], Exception]) -> str:
        """Write the store from ``items`` (``(recording id, source item)``, in store order); returns its URL.

        ``build(writer, item)`` writes the item's arrays through ``writer`` and returns its rows;
        ``nothing_prepared(report)`` is the error raised when no recording could be prepared;
        ``totals(report)`` the report's ``totals``.
        """
        with StoreWriter(self.dst, dataset=self.dataset, source_fingerprint=self.fingerprint, options=self.options,
                         overwrite=self.overwrite, protect=[self.root], **(self.storage_options or {})) as writer:
            rows = self.collect(writer, items, build)
            if not rows:
                raise nothing_prepared(self.report)
            rows.write(writer)
            self.report["totals"] = totals(self.report)
            writer.write_json(REPORT, self.report)
        return writer.url

    def collect(self, writer: StoreWriter, items: Sequence[tuple[str, T]],
                build: Callable[[StoreWriter, T], RecordingRows]) -> StoreRows:
        """Build every item, raising or skipping per ``errors``; the rows of those that were prepared."""
        rows = StoreRows(self.event_names)
        for rid, item in tqdm(items, desc=f"prepare {self.dataset}", unit=self.unit, disable=not self.progress):
            try:
                rec = build(writer, item)
            except SkipRecording as e:
                self.report["skipped"][rid] = str(e)
                continue
            except SourceFormatError as e:
                if self.errors == "raise":
                    raise
                self.report["failed"][rid] = str(e)
                continue
            rows.add(rec)
            self.report["recordings"][rid] = rec.report
        return rows


__all__ = ["ERRORS", "REPORT", "Prepare", "SkipRecording", "check_errors", "count_totals", "source_digest",
           "sum_counts", "summarize_failed"]
