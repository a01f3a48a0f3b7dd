"""The cache's only test hook: pause a shard's writer between its data and its commit (to be killed there).

``MMLOADER_CACHE_PAUSE_BEFORE_COMMIT=K[:SECONDS]`` makes the writer of shard K (``*``: of every shard) say so on
stderr and sleep (default an hour). Writers call ``testhooks.pause_before_commit(k)`` through this module, so a
test may also replace that function (``monkeypatch.setattr("mmloader.cache.testhooks.pause_before_commit", f)``).
"""

from __future__ import annotations

import os
import sys
import time

PAUSE_ENV = "MMLOADER_CACHE_PAUSE_BEFORE_COMMIT"


def pause_before_commit(k: int) -> None:
    """Called by a writer after writing shard ``k``'s data, before committing it; a no-op unless ``PAUSE_ENV``."""
    value = os.environ.get(PAUSE_ENV)
    if not value:
        return
    shard, _, secs = value.partition(":")
    if shard == "*" or int(shard) == k:
        print(f"mmloader cache: paused before committing shard {k} (pid {os.getpid()})", file=sys.stderr, flush=True)
        time.sleep(float(secs) if secs else 3600.0)
