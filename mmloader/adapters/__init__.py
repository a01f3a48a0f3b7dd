"""Deprecated import path: ``mmloader.adapters`` is now ``mmloader.recipes`` (kept for one release).

``mmloader.adapters.ego4d``, ``.ego4d_imu``, ``.ego4d_narration`` and ``.aria`` are aliases of the modules under
``mmloader.recipes``.
"""

import warnings

from ..recipes import Adapter, available, get_adapter  # noqa: F401

warnings.warn("mmloader.adapters is deprecated; import mmloader.recipes", DeprecationWarning, stacklevel=2)
