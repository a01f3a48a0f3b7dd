"""Deprecated import path: ``mmloader.adapters.ego4d`` is now ``mmloader.recipes.ego4d.recipe`` (this alias is kept for one release)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("mmloader.recipes.ego4d.recipe")
