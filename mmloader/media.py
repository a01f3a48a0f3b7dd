"""Deprecated import path: ``mmloader.media`` is now ``mmloader.video.probe`` (this alias is kept for one release)."""

import sys
import warnings

from .video import probe as _module

warnings.warn("mmloader.media is deprecated; import mmloader.video.probe", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _module
