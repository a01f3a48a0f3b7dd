"""Deprecated import path: ``mmloader.dataset`` is now ``mmloader.api`` (this alias is kept for one release).

``mmloader.open`` and ``mmloader.Dataset`` are the stable names.
"""

import sys
import warnings

from . import api as _module

warnings.warn("mmloader.dataset is deprecated; import mmloader.api (or use mmloader.open)", DeprecationWarning,
              stacklevel=2)
sys.modules[__name__] = _module
