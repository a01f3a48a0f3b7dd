"""Exceptions. Every message names the file (or URL), the field and what was expected."""

from __future__ import annotations


class MMLoaderError(Exception):
    """Base class of all mmloader errors."""


class StoreFormatError(MMLoaderError):
    """A prepared store is missing, incomplete, of another format version, or has a wrong column."""


class StoreUnreachableError(MMLoaderError, OSError):
    """A store URL whose storage cannot be reached (connection refused, unknown host, timeout): one line that
    names the URL and the endpoint. An ``OSError`` too, so ``except OSError`` keeps catching network failures."""


class SourceFormatError(MMLoaderError):
    """A native dataset file (CSV, JSON, ...) does not have the layout the recipe expects."""

    def __init__(self, path: str, problem: str, expected: str | None = None):
        self.path = str(path)
        self.problem = problem
        self.expected = expected
        msg = f"{self.path}: {problem}"
        if expected:
            msg += f" (expected {expected})"
        super().__init__(msg)


class MediaError(SourceFormatError):
    """A media file cannot be opened, probed or decoded."""
