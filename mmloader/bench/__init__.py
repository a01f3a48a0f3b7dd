"""``mmloader bench``: the Ego4D-like video benchmark, on generated data (``--synthetic``) or on any store.

It compares each way of reading windows with the sequential bound (every frame of every video the windows
reference decoded once, in order, by PyAV with threads): the loader in index order and shuffled at several worker
counts, the window cache's first epoch, ``cache build``, and (synthetic) the shuffled loader on a store prepared
through a transcode profile. ``synthetic`` generates the data, ``measure`` times the cases, ``run`` holds the
options, the orchestration, the JSON and the table; ``util`` what every benchmark shares (``benchmarks/``).
"""

from __future__ import annotations

from .run import CASES, DEFAULTS, SMOKE, BenchError, add_arguments, finish, format_table, resolve_args, run_bench

__all__ = ["CASES", "DEFAULTS", "SMOKE", "BenchError", "add_arguments", "finish", "format_table", "resolve_args",
           "run_bench"]
