"""The package version (one place; imported by the store writer and the cache without importing the package)."""

__version__ = "0.1.0"
