"""The one rule for the numbers of a result: each is finite and inside its valid range.

Runs (`peftseg.engine.run`), `peftseg eval`, the run record's writer (`peftseg.results`) and
`peftseg report` all ask `result_problems` whether a set of numbers may be recorded or shown
as a result; each then fails or marks the row, naming the entries this returns.

The ranges:
- metrics (AP, AP50, AP75, APs/APm/APl, AP-<class>, Cityscapes' AP, …): percentages, [0, 100];
- params: `ratio` (trainable / total) in (0, 1], every count a whole number >= 0, trainable <= total;
- efficiency: times (`*_s`, images/s too) and sizes (`*_bytes`) > 0 where measured (null: not
  measured), counts (timed steps, checkpointed blocks) whole numbers >= 0, processes and threads >= 1.

COCOeval has one legitimate value outside them: -1, its "undefined", for an AP it cannot
define (an area range with no ground truth: APs/APm/APl; a category absent from the val
split: `AP-<name>`); detectron2 turns it into NaN. Those entries are stored as null (never as
-1), with the reason in the record's `data_notes` (`undefined_notes`). The headline numbers
(AP, AP50, AP75 of every task) always have ground truth behind them when the split has
annotations, so NaN, -1 or null there means the evaluation itself went wrong (e.g. `area: -1`
in a COCO json), and is never an "ok" result; ±inf is wrong anywhere.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any

from peftseg.dotted import flatten
from peftseg.errors import UserError

log = logging.getLogger(__name__)

# numbers an evaluator must always define; NaN in any other metric means "no ground truth there"
HEADLINE = ("AP", "AP50", "AP75")
COCO_UNDEFINED = -1  # COCOeval's value for an AP it cannot define
PERCENT = (0, 100)
SIZE_RANGES = ("APs", "APm", "APl")  # COCOeval's area ranges: small, medium, large
COUNTS = {"timed_steps": 0, "checkpointed_blocks": 0, "compiled_blocks": 0, "num_processes": 1, "threads": 1}  # efficiency counts: minimum


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_nonfinite(value: Any) -> bool:
    return _number(value) and not math.isfinite(value)


def is_undefined(value: Any) -> bool:
    """COCOeval's "not defined here": -1 as it reports it, NaN as detectron2 passes it on, null as stored."""
    return value is None or (_number(value) and (math.isnan(value) or value == COCO_UNDEFINED))


def _text(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    return repr(float(value))  # every digit: 1.0000001, not 1


def _name(key: str) -> str:
    return key.rpartition(".")[2]


def _metric_name(key: str) -> str:
    """`AP-st. bernard` of `segm.AP-st. bernard`: a task has no dot, a class name may."""
    return key.partition(".")[2]


def metric_problem(key: str, value: Any) -> str | None:
    """Why one metric entry (`segm.AP`, `bbox.AP-circle`) is not a result; None when it is one
    or is undefined where COCOeval may leave it undefined (not a headline number)."""
    headline = _metric_name(key) in HEADLINE
    if value is None:
        return f"{key} is missing" if headline else None
    if not _number(value):
        return f"{key} = {value!r} is not a number"
    if math.isinf(value):
        return f"{key} = {_text(value)}"
    if is_undefined(value):
        if not headline:
            return None
        if math.isnan(value):
            return f"{key} = NaN"
        return f"{key} = -1 (COCOeval's 'undefined': nothing to score)"
    if not PERCENT[0] <= value <= PERCENT[1]:
        return f"{key} = {_text(value)}, outside [0, 100]"
    return None


def metric_problems(metrics: dict | None, required: tuple[str, ...] = ("segm",)) -> list[str]:
    """Why `metrics` ({task: {name: number}}) is not a result; [] when it is.

    A `required` task without an AP, a headline number that is undefined (NaN, -1, null), any
    ±inf, any number outside [0, 100]."""
    metrics = metrics or {}
    problems = []
    for task in required:
        if not isinstance(metrics.get(task), dict) or "AP" not in metrics[task]:
            problems.append(f"{task}.AP is missing")
    for key, value in flatten(metrics, lists=True).items():
        problem = metric_problem(key, value)
        if problem:
            problems.append(problem)
    return problems


def _whole(value) -> bool:
    return _number(value) and math.isfinite(value) and float(value).is_integer()


def number_problem(key: str, value: Any) -> str | None:
    """Why one entry of params or efficiency (`params.ratio`, `efficiency.peak_memory_bytes`) is
    outside its range; None when it is inside, is not a number (text: a device name), or is null."""
    if not _number(value):
        return None
    if not math.isfinite(value):
        return f"{key} = {_text(value)}"
    section, name = key.partition(".")[0], _name(key)
    if section == "params":
        if name == "ratio":
            return None if 0 < value <= 1 else f"{key} = {_text(value)}, outside (0, 1]"
        return None if _whole(value) and value >= 0 else f"{key} = {_text(value)}, not a count (a whole number >= 0)"
    if section == "efficiency":
        if name in COUNTS:
            low = COUNTS[name]
            return None if _whole(value) and value >= low else f"{key} = {_text(value)}, not a whole number >= {low}"
        if name.endswith(("_s", "_bytes")):  # times, rates and sizes
            return None if value > 0 else f"{key} = {_text(value)}, not > 0"
    return None


def number_problems(section: str, values: dict | None) -> list[str]:
    """Every number of a section of plain numbers (params, efficiency) outside its range."""
    problems = [p for key, v in flatten(values or {}, section, lists=True).items() if (p := number_problem(key, v))]
    if section == "params" and values:
        total, trainable = values.get("total"), values.get("trainable")
        if _number(total) and _number(trainable) and trainable > total:
            problems.append(f"params.trainable = {_text(trainable)} > params.total = {_text(total)}")
    return problems


def result_problems(metrics: dict | None, params: dict | None = None, efficiency: dict | None = None,
                    required: tuple[str, ...] = ("segm",)) -> list[str]:
    """Why a run's (or an evaluation's) numbers are not a result: [] when they are."""
    return (metric_problems(metrics, required) + number_problems("params", params)
            + number_problems("efficiency", efficiency))


def undefined_metrics(metrics: dict | None) -> list[str]:
    """The entries COCOeval left undefined (-1, NaN; null once stored) where it may: no ground
    truth in that area range or class on the split evaluated."""
    return [key for key, value in flatten(metrics or {}, lists=True).items()
            if _metric_name(key) not in HEADLINE and is_undefined(value)]


def undefined_notes(keys: list[str]) -> dict[str, int]:
    """The reasons for undefined entries, as `data_notes` kinds of the val split: kind -> count."""
    why: dict[str, list[str]] = {}
    for key in keys:
        name = _metric_name(key)
        if name in SIZE_RANGES:
            reason = "APs/APm/APl recorded as null: the val split has no instance of that size"
        elif name.startswith("AP-"):
            reason = "per-class AP recorded as null: the val split has no instance of that class"
        else:
            reason = "metrics recorded as null: not defined on the val split (no ground truth there)"
        why.setdefault(reason, []).append(key)
    return {f"{reason} ({', '.join(keys)})": len(keys) for reason, keys in why.items()}


def as_stored(metrics: dict | None) -> dict | None:
    """`metrics` as a record stores them: COCOeval's -1 ("undefined") as null, like NaN, in any
    entry (a failed or pruned record keeps the evaluator's numbers too); never as -1, which a
    reader would average or plot as a number."""
    if not isinstance(metrics, dict):
        return metrics
    return {task: {k: (None if _number(v) and v == COCO_UNDEFINED else v) for k, v in values.items()}
            if isinstance(values, dict) else values for task, values in metrics.items()}


def as_shown(section: str, values: dict | None) -> dict | None:
    """A section of a record (metrics, params or efficiency) with every entry that is not a
    result, or undefined, blank (None): what a table may show of a record marked invalid."""
    if values is None:
        return None

    def blank(prefix: str, value):
        if isinstance(value, dict):
            return {k: blank(f"{prefix}.{k}" if prefix else str(k), v) for k, v in value.items()}
        if section == "metrics":
            return None if is_undefined(value) or metric_problem(prefix, value) else value
        return None if number_problem(prefix, value) else value

    shown = blank("" if section == "metrics" else section, values)
    if section == "params" and number_problems("params", {k: values.get(k) for k in ("total", "trainable")}):
        shown.update(total=None, trainable=None, ratio=None)  # trainable > total: none of the three holds
    return shown


def finite_or_none(value: Any) -> Any:
    """A ratio or difference as shown: None (a dash) instead of NaN or ±inf."""
    return None if is_nonfinite(value) else value


def not_a_result(what: str, subject: str, problems: list[str]) -> str:
    """The one paragraph that says which numbers are not a result, and what each kind means."""
    return (
        f"{what} gave numbers that are not a result ({'; '.join(problems)}), so {subject} no result "
        "to record. A missing, NaN or -1 AP means the evaluation had nothing it could score: the model "
        "predicted nothing above model.score_thresh_test (as one trained for a few steps does), or the val split "
        "lacks instance annotations with segmentations and valid `area` values (>= 0, or leave `area` out and "
        "peftseg fills it); an AP outside [0, 100] means an evaluator that does not "
        "report percentages; inf means a diverged model or a broken timer; a ratio outside (0, 1] or a "
        "time or size <= 0 means broken accounting or timing."
    )


def check_result(metrics: dict | None, what: str, subject: str, params: dict | None = None,
                 efficiency: dict | None = None, required: tuple[str, ...] = ("segm",)) -> dict[str, int]:
    """Raise a UserError naming every problem unless the numbers are a result: a run records
    it as "failed" with this reason, `peftseg eval` writes it into eval.json and exits 2.

    When they are one, the undefined entries of `metrics` are set to null in place (so the
    caller stores null, never -1) and their reasons returned as data-note kinds: kind -> count."""
    problems = result_problems(metrics, params, efficiency, required)
    if problems:
        raise UserError(not_a_result(what, subject, problems))
    undefined = undefined_metrics(metrics)
    if undefined:  # COCOeval's -1/NaN: no ground truth in that area range or class; stored as null
        log.info("not defined on this val split (no ground truth there), recorded as null: %s", ", ".join(undefined))
        for values in metrics.values():
            for key, value in values.items() if isinstance(values, dict) else ():
                if key not in HEADLINE and is_undefined(value):
                    values[key] = None
    return undefined_notes(undefined)
