"""report.csv: one row per run with every flattened config value and number."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, is_dataclass
from pathlib import Path

from peftseg.dotted import flatten
from peftseg.io.atomic import write_atomic
from peftseg.results import Record


def flat_row(record: Record, extra: dict) -> dict:
    row: dict = {"run.id": record.run.id, "status": record.status}
    row.update(record.config)  # already flat: model.*, method.*, …
    for section in ("params", "metrics", "efficiency", "run", "versions"):
        value = getattr(record, section) or {}
        # run is a dataclass: flattened as run.id, run.dir, … (not one column holding its Python repr)
        row.update(flatten(asdict(value) if is_dataclass(value) else value, section))
    error = record.error or {}
    row["error.type"], row["error.message"] = error.get("type"), error.get("message")
    row.update(extra)
    return row


def _column_rank(key: str) -> int:
    order = ("run.id", "status", "model.name", "dataset.name", "method.name", "model.", "method.",
             "dataset.", "train.", "params.", "metrics.", "efficiency.", "baseline.", "run.", "versions.",
             "error.")
    for i, prefix in enumerate(order):
        if key == prefix or (prefix.endswith(".") and key.startswith(prefix)):
            return i
    return len(order)


def _csv_value(value):
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return value


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    keys.sort(key=_column_rank)  # stable: first-seen order within a section
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(v) for k, v in row.items()})
    write_atomic(path, buf.getvalue().encode())
