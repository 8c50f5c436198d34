"""What `peftseg search` may sample: each method declares its knobs' ranges in its own
registration (`register_method(..., search_space=(...))`), so every registered method is
searchable and a new method needs no list edited anywhere else.

A knob names a key under `method.` (`rank`, or `adapter.bottleneck` for a combination) and
its range. Sampling turns knobs into Optuna `suggest_*` calls and the values into Hydra
overrides (`method.rank=8`). Optuna requires one distribution per parameter name across a
study, and `rank` means different things to LoRA and VeRA, so a knob's Optuna name carries
its method: `lora.rank`, `vera.rank`.

Light module (dataclasses only): method modules import it at registration time, and the
registry must stay cheap to load. Optuna is only touched through the `trial` passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable


@dataclass(frozen=True)
class Int:
    """An integer in [low, high]; `log`: sampled on a log scale (ranks, widths)."""
    key: str
    low: int
    high: int
    log: bool = False

    def suggest(self, trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, log=self.log)

    def override(self, value) -> str:
        return str(int(value))


@dataclass(frozen=True)
class Float:
    """A float in [low, high]; `log`: sampled on a log scale (learning rates, scales)."""
    key: str
    low: float
    high: float
    log: bool = False

    def suggest(self, trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def override(self, value) -> str:
        return repr(float(value))


@dataclass(frozen=True)
class Choice:
    """One of `choices`. A choice may be a tuple (a list-valued knob such as LoRA's target
    groups): Optuna's categorical values must be None/bool/int/float/str, so a tuple is
    offered to Optuna as its comma-joined label and turned back into a list override."""
    key: str
    choices: tuple

    def _label(self, choice) -> Any:
        return ",".join(map(str, choice)) if isinstance(choice, tuple) else choice

    def suggest(self, trial, name: str):
        labels = [self._label(c) for c in self.choices]
        picked = trial.suggest_categorical(name, labels)
        return self.choices[labels.index(picked)]

    def override(self, value) -> str:
        if isinstance(value, tuple):
            return "[" + ",".join(map(str, value)) + "]"
        return str(value).lower() if isinstance(value, bool) else str(value)


Knob = Int | Float | Choice


def prefixed(prefix: str, knobs: Iterable[Knob]) -> tuple[Knob, ...]:
    """`knobs` of a part of a combined method, under `method.<prefix>.`."""
    from dataclasses import replace

    return tuple(replace(k, key=f"{prefix}.{k.key}") for k in knobs)


def sample_method_knobs(trial, method: str, knobs: Iterable[Knob], fixed: set[str] = frozenset()) -> list[str]:
    """Sample `method`'s knobs into `trial`; the Hydra overrides (`method.<key>=<value>`) they
    make. Keys in `fixed` (set by the user on the command line) are left as the user set them."""
    overrides = []
    for knob in knobs:
        key = f"method.{knob.key}"
        if key in fixed:
            continue
        value = knob.suggest(trial, f"{method}.{knob.key}")
        overrides.append(f"{key}={knob.override(value)}")
    return overrides
