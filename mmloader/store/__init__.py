"""The prepared store: writer (atomic) and reader (validating)."""

from .reader import Store
from .writer import StoreWriter, check_recording_id

__all__ = ["Store", "StoreWriter", "check_recording_id"]
