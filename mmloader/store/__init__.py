"""The prepared store: writer (atomic) and reader (validating)."""

from .reader import Store
from .writer import StoreWriter

__all__ = ["Store", "StoreWriter"]
