"""The layout stays what docs/architecture.md says: imports go one way, no cycles, no long functions.

Layers, lowest first (a module may import its own layer's modules and lower layers; never a higher one):

    core      mmloader.{errors, fsutil, paths, lru, dist, shm, shared_batch, _version}
    video     mmloader.video          decoding, probing, media identity
    store     mmloader.store          the prepared store: schema, writer, reader
    windows   mmloader.windows        spec, index, WindowSet, resample, collate
    recipes   mmloader.recipes        source layouts -> a store (a sibling of windows: neither imports the other)
    cache     mmloader.cache          the window cache, wrapping any Windows
    loader    mmloader.loader         WindowLoader
    front     mmloader.{api, coordinate, cli, samples, __init__} and the deprecated aliases
    plugin    imu2clip_plugin

Function-level imports of a higher layer are allowed only in the fluent front doors listed in ``FRONT_DOORS``
(``ws.cache()``, ``ws.loader()``): they are the public API a user calls, and they import lazily on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mmloader", "imu2clip_plugin")
MAX_FUNCTION_LINES = 80

LAYERS = ["core", "video", "store", "windows", "cache", "loader", "front", "plugin"]
RANK = {name: i for i, name in enumerate(LAYERS)}
RANK["recipes"] = RANK["windows"]
SIBLINGS = {frozenset({"windows", "recipes"})}
DEPRECATED_ALIASES = {"mmloader.adapters", "mmloader.byo", "mmloader.media", "mmloader.windowset",
                      "mmloader.resample", "mmloader.collate", "mmloader.dataset", "mmloader.schema"}
# (module, function) -> the higher-layer modules it may import lazily
FRONT_DOORS = {
    ("mmloader.windows.dataset", "WindowSet.cache"): {"mmloader.cache"},
    ("mmloader.windows.dataset", "WindowSet.loader"): {"mmloader.loader"},
}
# argparse set-up is exempt from the length rule (the issue says so)
LONG_FUNCTION_EXEMPT = {("mmloader.cli", "build_parser"), ("imu2clip_plugin.cli", "build_parser")}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "imu2clip_plugin":
        return "plugin"
    if len(parts) == 1 or module in DEPRECATED_ALIASES or module.startswith("mmloader.adapters."):
        return "front"
    top = parts[1]
    if top in ("errors", "fsutil", "paths", "lru", "dist", "shm", "shared_batch", "batch_memory", "_version"):
        return "core"
    if top in ("video", "store", "windows", "recipes", "cache", "loader"):
        return top
    if top in ("api", "coordinate", "cli", "samples", "schemas", "bench"):
        return "front"
    raise AssertionError(f"{module}: not assigned to a layer; add it to tests/test_architecture.py and "
                         f"docs/architecture.md")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom, known: dict[str, Path]) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    # ``from pkg import sub`` imports the module pkg.sub; ``from mod import name`` imports mod
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def _is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:`` exactly (not ``if not TYPE_CHECKING``)."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _ImportFinder(ast.NodeVisitor):
    """Every import of a module, with the qualified name of the function it sits in (None at module level):
    ``import``, ``from ... import``, and ``importlib.import_module("...")`` / ``__import__("...")`` with a
    constant name. The body of ``if TYPE_CHECKING:`` is skipped (annotations only)."""

    def __init__(self, module: str, is_package: bool, known: dict[str, Path]):
        self.module, self.is_package, self.known = module, is_package, known
        self.scope: list[str] = []
        self.found: list[tuple[str, str | None, int]] = []

    def _scoped(self, node: ast.AST, name: str) -> None:
        self.scope.append(name)
        self.generic_visit(node)
        self.scope.pop()

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._scoped(node, node.name)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._scoped(node, node.name)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def _owner(self) -> str | None:
        return ".".join(self.scope) if self.scope else None

    def _add(self, names: list[str], line: int) -> None:
        for name in names:
            parts = name.split(".")  # the longest prefix that is a project module
            while parts and ".".join(parts) not in self.known:
                parts.pop()
            entry = (".".join(parts), self._owner(), line)
            if parts and entry[0] != self.module and entry not in self.found:
                self.found.append(entry)

    def visit_Import(self, node: ast.Import) -> None:
        self._add([a.name for a in node.names], node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self._add(_resolve(self.module, self.is_package, node, self.known), node.lineno)

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        if called in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            name = node.args[0].value
            if name.startswith("."):  # relative to this module's package
                level = len(name) - len(name.lstrip("."))
                parts = self.module.split(".")
                keep = len(parts) - level + (1 if self.is_package else 0)
                name = ".".join(parts[:keep] + ([name.lstrip(".")] if name.lstrip(".") else []))
            self._add([name], node.lineno)
        self.generic_visit(node)


def imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(imported project module, qualified name of the enclosing function or None at module level, line)."""
    finder = _ImportFinder(module, path.name == "__init__.py", known)
    finder.visit(ast.parse(path.read_text(), str(path)))
    return finder.found


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return known, {m: imports(m, p, known) for m, p in known.items()}


def test_every_module_has_a_layer(graph):
    known, _ = graph
    for m in known:
        layer_of(m)


def test_imports_only_go_down_the_layers(graph):
    known, edges = graph
    bad = []
    for m, targets in edges.items():
        lm = layer_of(m)
        for target, function, line in targets:
            lt = layer_of(target)
            if target == "mmloader" and lm != "plugin" and m != "mmloader":
                bad.append(f"{m}:{line} imports the package root 'mmloader' (import the module it needs)")
                continue
            if lm == lt or target == "mmloader":
                continue
            if frozenset({lm, lt}) in SIBLINGS:
                bad.append(f"{m}:{line} ({lm}) imports {target} ({lt}): siblings must not import each other")
            elif RANK[lt] > RANK[lm]:
                allowed = FRONT_DOORS.get((m, function or ""), set())
                if target not in allowed:
                    bad.append(f"{m}:{line} ({lm}) imports {target} ({lt}), a higher layer")
    assert not bad, "imports reaching up:\n" + "\n".join(bad)


def test_no_import_cycles_at_module_level(graph):
    _, edges = graph
    module_level = {m: {t for t, fn, _ in ts if fn is None} for m, ts in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(module_level.get(m, ())):
            if t.startswith(m + ".") or m.startswith(t + ".") or t == "mmloader":
                continue  # a package and its own submodules
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(module_level):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_function_is_longer_than_80_lines(graph):
    known, _ = graph
    long = []
    for m, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and (m, node.name) not in LONG_FUNCTION_EXEMPT:
                    long.append(f"{m}.{node.name} ({path.relative_to(ROOT)}:{node.lineno}): {n} lines")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def test_the_layer_rule_catches_an_upward_import(tmp_path):
    """The checker itself can fail: a store module importing the cache is flagged."""
    fake = tmp_path / "mmloader" / "store" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from ..cache import WindowCache\n")
    known = {"mmloader.store.bad": fake, "mmloader.cache": fake, "mmloader.store": fake}
    found = imports("mmloader.store.bad", fake, known)
    assert found == [("mmloader.cache", None, 1)]
    assert RANK[layer_of("mmloader.cache")] > RANK[layer_of("mmloader.store.bad")]


def test_the_layer_rule_sees_through_the_usual_disguises(tmp_path):
    fake = tmp_path / "mmloader" / "store" / "sly.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("import importlib\n"
                    "from typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n    from ..cache import WindowCache\n"
                    "if not TYPE_CHECKING:\n    from ..loader import WindowLoader\n"
                    "class Other:\n    def cache(self):\n        return importlib.import_module('mmloader.cache')\n"
                    "def f():\n    return __import__('mmloader.windows')\n")
    known = {"mmloader.store.sly": fake, "mmloader.cache": fake, "mmloader.loader": fake, "mmloader.windows": fake}
    found = imports("mmloader.store.sly", fake, known)
    assert ("mmloader.cache", None, 4) not in found  # annotations only
    assert ("mmloader.loader", None, 6) in found
    assert ("mmloader.cache", "Other.cache", 9) in found  # not the WindowSet.cache front door
    assert ("mmloader.windows", "f", 11) in found
