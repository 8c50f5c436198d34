"""The one rule for numbers that are not finite (invariant 1: NaN or ±inf is never a result).

Runs (`peftseg.engine.run`), `peftseg eval` and `peftseg report` all ask `result_problems`
whether a set of numbers may be recorded or shown as a result; each then fails or marks the
row, naming the entries this returns.

COCOeval has one legitimate non-finite value: it reports -1 for an AP it cannot define (an
area range with no ground truth: APs/APm/APl; a category absent from the val split:
`AP-<name>`), which detectron2 turns into NaN and peftseg stores as null. Those entries are
"undefined", not wrong. The headline numbers (AP, AP50, AP75 of every task) always have
ground truth behind them when the split has annotations, so NaN there means the evaluation
itself went wrong (e.g. `area: -1` in a COCO json), and ±inf is wrong anywhere.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from peftseg.errors import UserError

log = logging.getLogger(__name__)

# numbers an evaluator must always define; NaN in any other metric means "no ground truth there"
HEADLINE = ("AP", "AP50", "AP75")


def is_nonfinite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _walk(prefix: str, value: Any):
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from _walk(f"{prefix}.{key}" if prefix else str(key), sub)
    elif isinstance(value, (list, tuple)):
        for i, sub in enumerate(value):
            yield from _walk(f"{prefix}[{i}]", sub)
    else:
        yield prefix, value


def _describe(key: str, value: float) -> str:
    return f"{key} = {'NaN' if math.isnan(value) else ('inf' if value > 0 else '-inf')}"


def metric_problems(metrics: dict | None, required: tuple[str, ...] = ("segm",)) -> list[str]:
    """Why `metrics` ({task: {name: number}}) is not a result; [] when it is.

    A `required` task without a finite AP, a headline number that is NaN, or any ±inf."""
    metrics = metrics or {}
    problems = []
    for task in required:
        if not isinstance(metrics.get(task), dict) or metrics[task].get("AP") is None:
            problems.append(f"{task}.AP is missing")
    for key, value in _walk("", metrics):
        if not is_nonfinite(value):
            continue
        if math.isinf(value) or key.rpartition(".")[2] in HEADLINE:
            problems.append(_describe(key, value))
    return problems


def number_problems(section: str, values: dict | None) -> list[str]:
    """Every non-finite number in a section of plain numbers (params, efficiency, ratios)."""
    return [_describe(key, v) for key, v in _walk(section, values or {}) if is_nonfinite(v)]


def result_problems(metrics: dict | None, params: dict | None = None, efficiency: dict | None = None,
                    required: tuple[str, ...] = ("segm",)) -> list[str]:
    """Why a run's (or an evaluation's) numbers are not a result: [] when they are."""
    return (metric_problems(metrics, required) + number_problems("params", params)
            + number_problems("efficiency", efficiency))


def undefined_metrics(metrics: dict | None) -> list[str]:
    """The NaN entries COCOeval uses for "not defined here" (stored as null), for a log line."""
    return [key for key, value in _walk("", metrics or {}) if is_nonfinite(value) and math.isnan(value)
            and key.rpartition(".")[2] not in HEADLINE]


def finite_or_none(value: Any) -> Any:
    """A ratio or difference as shown: None (a dash) instead of NaN or ±inf."""
    return None if is_nonfinite(value) else value


def check_result(metrics: dict | None, what: str, subject: str, params: dict | None = None,
                 efficiency: dict | None = None, required: tuple[str, ...] = ("segm",)) -> None:
    """Raise a UserError naming every problem unless the numbers are a result: a run records
    it as "failed" with this reason, `peftseg eval` writes it into eval.json and exits 2."""
    problems = result_problems(metrics, params, efficiency, required)
    if problems:
        raise UserError(
            f"{what} gave numbers that are not a result ({'; '.join(problems)}), so {subject} no result "
            "to record. A missing or NaN AP means the evaluation matched nothing it could score: check that "
            "the val split has instance annotations with segmentations and valid `area` values (>= 0, or "
            "leave `area` out and peftseg fills it); inf means a diverged model or a broken timer."
        )
    undefined = undefined_metrics(metrics)
    if undefined:  # COCOeval's -1: no ground truth in that area range or class; stored as null
        log.info("not defined on this val split (no ground truth there), recorded as null: %s", ", ".join(undefined))
