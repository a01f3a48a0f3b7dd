"""Where mmloader keeps what it generates or prepares on its own (``open("ego4d", root=...)``, samples)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$MMLOADER_CACHE_DIR``, else ``$XDG_CACHE_HOME/mmloader``, else ``~/.cache/mmloader``."""
    env = os.environ.get("MMLOADER_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mmloader"
