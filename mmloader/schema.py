"""Deprecated import path: ``mmloader.schema`` is now ``mmloader.store.schema`` (this alias is kept for one release)."""

import sys
import warnings

from .store import schema as _module

warnings.warn("mmloader.schema is deprecated; import mmloader.store.schema", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _module
