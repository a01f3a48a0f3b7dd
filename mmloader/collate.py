"""Deprecated import path: ``mmloader.collate`` is now ``mmloader.windows.collate`` (this alias is kept for one release)."""

import sys
import warnings

from .windows import collate as _module

warnings.warn("mmloader.collate is deprecated; import mmloader.windows.collate", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _module
