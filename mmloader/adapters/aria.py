"""Deprecated import path: ``mmloader.adapters.aria`` is now ``mmloader.recipes.aria.recipe`` (this alias is kept for one release)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("mmloader.recipes.aria.recipe")
