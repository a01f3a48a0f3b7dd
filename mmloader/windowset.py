"""Deprecated import path: ``mmloader.windowset`` is now ``mmloader.windows.dataset`` (this alias is kept for one release)."""

import sys
import warnings

from .windows import dataset as _module

warnings.warn("mmloader.windowset is deprecated; import mmloader.windows.dataset", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _module
