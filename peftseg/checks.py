"""Field checks for config dataclasses, called from their `__post_init__`.

OmegaConf builds the dataclass (`OmegaConf.to_object`) right after Hydra composes the
config, so a bad value fails there: before any heavy import or model build, with one
message that names the field, the value and what it accepts. Light module: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from peftseg.errors import UserError


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def choice(field: str, value, choices: Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise UserError(
            f"{field}={value!r} is not one of the choices: {', '.join(map(str, choices))} "
            f"(e.g. {field}={choices[0]})."
        )


def integer(field: str, value, minimum: int | None = None, maximum: int | None = None, why: str = "") -> None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and maximum is not None and value > maximum:
        ok = False
    if not ok:
        rng = (f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
               if minimum is not None else "")
        raise UserError(f"{field} must be an integer {rng} (got {value!r}){'; ' + why if why else ''}.")


def number(field: str, value, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, why: str = "") -> None:
    ok = _is_number(value) and math.isfinite(value)
    if ok and low is not None and (value <= low if low_open else value < low):
        ok = False
    if ok and high is not None and (value >= high if high_open else value > high):
        ok = False
    if not ok:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high}")
        rng = " and ".join(parts) if parts else "finite"
        raise UserError(f"{field} must be a number {rng} (got {value!r}){'; ' + why if why else ''}.")
