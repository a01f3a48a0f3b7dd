"""Deprecated import path: ``mmloader.byo`` is now ``mmloader.recipes.custom`` (this alias is kept for one release).

``mmloader.write_store``, ``mmloader.Recording`` and ``mmloader.TimeSeriesInput`` are the stable names.
"""

import sys
import warnings

from .recipes import custom as _module

warnings.warn("mmloader.byo is deprecated; import mmloader.recipes.custom (or use mmloader.write_store)",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _module
