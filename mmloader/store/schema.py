"""The store schema: one source of truth (``schemas/store-v<N>.json``) for the writer and the reader.

``table_schema("streams")`` gives the Arrow schema the writer casts to; ``check_table`` is what the
reader runs on every table it opens, with errors naming the file and the field.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

import pyarrow as pa

from ..errors import StoreFormatError

FORMAT = "mmloader-store"
FORMAT_VERSION = 2
MANIFEST = "mmloader.json"  # the store's manifest file, at its root


@lru_cache(maxsize=None)
def load_schema(version: int = FORMAT_VERSION) -> dict[str, Any]:
    """The parsed schema document of a store format version."""
    try:
        text = resources.files("mmloader.schemas").joinpath(f"store-v{version}.json").read_text()
    except FileNotFoundError:
        raise StoreFormatError(f"no schema for store format version {version}") from None
    return json.loads(text)


def arrow_type(name: str) -> pa.DataType:
    """Arrow type of a schema type string: ``int64``, ``string``, ``double``, ``list<string>``..."""
    if name.startswith("list<") and name.endswith(">"):
        return pa.list_(arrow_type(name[5:-1]))
    return pa.type_for_alias(name)


def _columns(kind: str, version: int) -> list[dict[str, Any]]:
    doc = load_schema(version)
    if kind == "events":
        return doc["events"]["columns"]
    return doc["tables"][kind]["columns"]


def table_schema(kind: str, version: int = FORMAT_VERSION) -> pa.Schema:
    """Arrow schema of a table kind: ``recordings``, ``streams``, ``gaps`` or ``events``."""
    return pa.schema(
        [pa.field(c["name"], arrow_type(c["type"]), nullable=c["nullable"]) for c in _columns(kind, version)]
    )


def table_file(kind: str, version: int = FORMAT_VERSION) -> str:
    """Path of a table inside the store."""
    return load_schema(version)["tables"][kind]["file"]


def conform(table: pa.Table, kind: str, where: str = "<table>") -> pa.Table:
    """Cast ``table`` to the schema of ``kind`` (required columns first, extra columns kept for events).

    Raises StoreFormatError naming ``where`` and the field when a column is missing or cannot be cast.
    """
    schema = table_schema(kind)
    arrays, fields = [], []
    for field in schema:
        if field.name not in table.column_names:
            raise StoreFormatError(f"{where}: missing column '{field.name}' (expected {field.type})")
        col = table.column(field.name)
        try:
            col = col.cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise StoreFormatError(
                f"{where}: column '{field.name}' has type {col.type}, expected {field.type}: {e}"
            ) from None
        if not field.nullable and col.null_count:
            raise StoreFormatError(f"{where}: column '{field.name}' has {col.null_count} nulls, expected none")
        arrays.append(col)
        fields.append(field)
    if kind == "events":
        for name in table.column_names:
            if name not in schema.names:
                arrays.append(table.column(name))
                fields.append(table.schema.field(name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def check_table(table: pa.Table, kind: str, where: str, version: int = FORMAT_VERSION) -> None:
    """Validate a table read from a store: every schema column present with exactly its type."""
    for field in table_schema(kind, version):
        if field.name not in table.column_names:
            raise StoreFormatError(f"{where}: missing column '{field.name}' (expected {field.type})")
        found = table.schema.field(field.name).type
        if found != field.type:
            raise StoreFormatError(f"{where}: column '{field.name}' has type {found}, expected {field.type}")
        if not field.nullable and table.column(field.name).null_count:
            raise StoreFormatError(f"{where}: column '{field.name}' has nulls, expected none")


def check_manifest(manifest: Any, where: str) -> None:
    """Validate ``mmloader.json``: format name, version and required fields with their JSON types."""
    if not isinstance(manifest, dict):
        raise StoreFormatError(f"{where}: expected a JSON object, found {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise StoreFormatError(f"{where}: field 'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreFormatError(
            f"{where}: store format version {version!r}; this mmloader reads version {FORMAT_VERSION} only. "
            "Prepare the store again with this version (mmloader prepare ...)."
        )
    json_types = {"string": str, "int": int, "object": dict}
    for name, type_name in load_schema(version)["manifest"]["fields"].items():
        if name not in manifest:
            raise StoreFormatError(f"{where}: missing field '{name}' (expected {type_name})")
        if not isinstance(manifest[name], json_types[type_name]):
            raise StoreFormatError(
                f"{where}: field '{name}' is {type(manifest[name]).__name__}, expected {type_name}"
            )
    for rel, entry in manifest["files"].items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get("sha256", ""), str)
        ):
            raise StoreFormatError(
                f"{where}: field 'files' entry {rel!r} is {entry!r}, expected {{\"size\": int, \"sha256\": str}}"
            )
        if "sha256" not in entry and not rel.startswith("media/"):
            raise StoreFormatError(
                f"{where}: field 'files' entry {rel!r} has no sha256 (every file but media/ has one, Zarr chunks "
                "included; a store written by an earlier mmloader): prepare the store again"
            )
