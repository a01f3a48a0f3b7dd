"""Dataset adapters ("recipes"): each reads a native layout and writes a store.

Built-in: ``ego4d``, ``aria``. Third parties register more through the entry-point group ``mmloader.datasets``::

    [project.entry-points."mmloader.datasets"]
    mydata = "mypkg.adapter:MyAdapter"

An adapter is a class with a ``name``, ``fingerprint(root) -> str`` and
``prepare(root, dst, *, overwrite=False, progress=True) -> str`` (the store URL).

The toolkit recipes are written on, so that a recipe holds only the parsing and repair of its source:
``base`` (the prepare loop: raise-or-skip, the report and its totals, the tables written), ``rows`` (stream,
gap, event and recording rows; rows → Arrow tables) and ``imu`` (channels and units, sort and de-duplicate,
gaps). ``ego4d/``, ``aria/`` and ``custom`` (``write_store``, for data already in arrays) use it.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Adapter(Protocol):
    """What ``mmloader.open(name, root=...)`` and ``mmloader prepare NAME`` need from a recipe."""

    name: str

    def fingerprint(self, root: str) -> str:
        """A digest of the source that changes when the source does (names, sizes, mtimes)."""
        ...

    def prepare(self, root: str, dst: str, *, overwrite: bool = False, progress: bool = True, **options: Any) -> str:
        """Write a store at ``dst`` from the native layout at ``root``; returns the store URL."""
        ...


def _builtin() -> dict[str, Any]:
    from .aria import AriaAdapter  # imports projectaria-tools only when a recording is read
    from .ego4d import Ego4DAdapter

    return {"aria": AriaAdapter, "ego4d": Ego4DAdapter}


def available() -> list[str]:
    """Names of all registered datasets (built-in and entry points)."""
    names = set(_builtin())
    names.update(ep.name for ep in entry_points(group="mmloader.datasets"))
    return sorted(names)


def get_adapter(name: str) -> Adapter:
    """An adapter instance by dataset name; entry points may add or override names."""
    for ep in entry_points(group="mmloader.datasets"):
        if ep.name == name:
            return ep.load()()
    builtin = _builtin()
    if name in builtin:
        return builtin[name]()
    raise KeyError(f"unknown dataset {name!r}; registered: {available()}")
