"""Deprecated import path: ``mmloader.resample`` is now ``mmloader.windows.resample`` (this alias is kept for one release)."""

import sys
import warnings

from .windows import resample as _module

warnings.warn("mmloader.resample is deprecated; import mmloader.windows.resample", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _module
