"""A run's `metrics.json`: detectron2's JSONWriter log, one JSON object per line, written every
`train.log_period` iterations (plus the evaluation lines). The one reader of that file:
report curves, MLflow tracking and resume trimming all go through it."""

from __future__ import annotations

import json
from pathlib import Path

FILENAME = "metrics.json"


def read_training_log(run_dir: Path) -> list[tuple[str, dict]]:
    """(raw line, parsed object) of every whole line with an "iteration"; empty when the file is
    missing. A line cut by a kill (the last one) or one that is not an object is skipped."""
    path = Path(run_dir) / FILENAME
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("iteration"), int):
            rows.append((line, row))
    return rows
