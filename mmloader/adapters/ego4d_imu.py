"""Deprecated import path: ``mmloader.adapters.ego4d_imu`` is now ``mmloader.recipes.ego4d.imu`` (this alias is kept for one release)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("mmloader.recipes.ego4d.imu")
