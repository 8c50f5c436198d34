"""Nested values as one flat dict of dotted keys (`method.rank`, `metrics.segm.AP`): the run
record's config, report.csv's columns, the comparison of a resumed run's settings and the
checks of a result's numbers all read them this way."""

from __future__ import annotations

from typing import Any


def flatten(value: Any, prefix: str = "", *, depth: int | None = None, lists: bool = False) -> dict[str, Any]:
    """`value`'s entries under dotted keys: {"a": {"b": 1}} -> {"a.b": 1}, each key after `prefix`
    ("p" -> "p.a.b"). `depth`: how many levels of dicts are opened (None: all); a dict below them
    is one value. `lists`: lists and tuples are opened too, as `key[i]`; otherwise a list is one
    value. An empty dict that is opened adds no key; a value that is not opened is kept under
    `prefix` itself."""
    out: dict[str, Any] = {}

    def walk(key: str, node: Any, levels: int | None) -> None:
        if isinstance(node, dict) and levels != 0:
            for k, sub in node.items():
                walk(f"{key}.{k}" if key else str(k), sub, None if levels is None else levels - 1)
        elif lists and isinstance(node, (list, tuple)):
            for i, sub in enumerate(node):
                walk(f"{key}[{i}]", sub, levels)
        else:
            out[key] = node

    walk(prefix, value, depth)
    return out
