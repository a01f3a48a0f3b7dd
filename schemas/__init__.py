"""Versioned JSON schemas of the mmloader store (installed as the package data ``mmloader.schemas``)."""
