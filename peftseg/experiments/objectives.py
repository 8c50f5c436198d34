"""The objective(s) `peftseg search` optimises (and the train task returns).

`objective=segm_ap` (default) or a list, e.g. `objective=[segm_ap,trainable_pct]` for a
multi-objective (NSGA-II) search. Each name maps to a number of the run record and the
direction that is better, so objective and direction never disagree.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from peftseg.errors import UserError


def _get(record: dict, *path: str):
    node: Any = record
    for key in path:
        node = (node or {}).get(key)
    return node


def _scaled(value, factor: float):
    return None if value is None else value * factor


# name -> (value of a record, direction Optuna should take it in, what it is)
OBJECTIVES: dict[str, tuple[Callable[[dict], float | None], str, str]] = {
    "segm_ap": (lambda r: _get(r, "metrics", "segm", "AP"), "maximize", "mask AP"),
    "bbox_ap": (lambda r: _get(r, "metrics", "bbox", "AP"), "maximize", "box AP"),
    "trainable_pct": (lambda r: _scaled(_get(r, "params", "ratio"), 100.0), "minimize",
                      "trainable parameters, % of the model"),
    "trainable_params": (lambda r: _get(r, "params", "trainable"), "minimize", "trainable parameters"),
    "peak_memory": (lambda r: _scaled(_get(r, "efficiency", "peak_memory_bytes"), 2.0 ** -30), "minimize",
                    "peak training memory, GiB"),
    "step_time": (lambda r: _get(r, "efficiency", "mean_step_time_s"), "minimize", "mean step time, s"),
    "checkpoint_mb": (lambda r: _scaled(_get(r, "efficiency", "checkpoint_bytes"), 2.0 ** -20), "minimize",
                      "checkpoint size, MiB"),
}


def objective_names(objective) -> list[str]:
    """The objective config value as a list of known names; UserError otherwise."""
    names = [objective] if isinstance(objective, str) else list(objective or [])
    unknown = [n for n in names if n not in OBJECTIVES]
    if not names or unknown:
        raise UserError(
            f"objective={objective!r} is not a known objective; use one of {', '.join(OBJECTIVES)} or a list "
            "of them, e.g. objective=segm_ap or objective=[segm_ap,trainable_pct]."
        )
    return [str(n) for n in names]


def objective_values(record, objective) -> float | list[float] | None:
    """The run's objective value(s); None when the run failed or lacks a finite number, which
    a search then records as a failed trial (not as a score of 0)."""
    names = objective_names(objective)
    if hasattr(record, "to_dict"):  # a peftseg.results.Record
        record = record.to_dict()
    if record.get("status") != "ok":
        return None
    values = [OBJECTIVES[n][0](record) for n in names]
    # NaN/inf is no score (COCOEvaluator gives NaN AP when a model predicted nothing)
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    values = [float(v) for v in values]
    return values[0] if isinstance(objective, str) else values


def directions(objective) -> str | list[str]:
    """Optuna's direction(s) for `objective`."""
    names = objective_names(objective)
    found = [OBJECTIVES[n][1] for n in names]
    return found[0] if isinstance(objective, str) else found


def _rounded(value: float) -> str:
    """`value` with 2 decimals, more where it needs them for 3 significant digits (66.91, 2.31,
    0.0123), in plain notation."""
    if value == 0 or not math.isfinite(value):
        return f"{value:.2f}"
    decimals = max(2, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def shown_value(name: str, value: float) -> str:
    """One objective's value as the console shows it: AP to 2 decimals (as the report tables),
    counts whole, the rest to 2 decimals or 3 significant digits, with their unit where the
    name has none. search.json and the study keep the full numbers."""
    if name in ("segm_ap", "bbox_ap"):
        return f"{value:.2f}"
    if name == "trainable_params":
        return f"{round(value):,}"
    unit = {"peak_memory": " GiB", "step_time": " s"}.get(name, "")
    return _rounded(value) + unit


def shown_values(objective, values) -> str:
    """The objective(s) of a trial, labelled: `segm_ap 41.27, trainable_pct 2.31`."""
    names = objective_names(objective)
    values = values if isinstance(values, (list, tuple)) else [values]
    return ", ".join(f"{n} {shown_value(n, float(v))}" for n, v in zip(names, values))
