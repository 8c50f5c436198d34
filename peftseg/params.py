"""Parameter accounting: total, trainable, ratio, and the same per group.

The ratio is over the model as run, method modules included, so LoRA's own parameters
count in the denominator too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from peftseg.models.family import ACCOUNTING_GROUPS, FamilyMap, facts_of

if TYPE_CHECKING:
    import torch.nn as nn

GROUPS = (*ACCOUNTING_GROUPS, "peft", "other")


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int
    ratio: float
    by_group: dict[str, dict[str, int]]

    def to_dict(self) -> dict:
        return asdict(self)


def mark_added(model: nn.Module, params, owner: str) -> None:
    """Record parameters a method inserted (called by the method, at injection, when they
    are known): accounting, learning-rate groups and checkpoints read this record instead
    of guessing from parameter names. Kept by name, so a deepcopy of the model keeps it."""
    wanted = list(params)
    owned = _facts(model).added
    for name, p in model.named_parameters():
        if any(p is q for q in wanted):
            owned[name] = owner


def forget_added(model: nn.Module, owner: str | None = None) -> None:
    """Forget the parameters `owner` (None: every method) inserted, once its modules are gone."""
    owned = _facts(model).added
    for name in [n for n, o in owned.items() if owner is None or o == owner]:
        del owned[name]


def _facts(model: nn.Module):
    facts = facts_of(model)
    if facts is None:
        raise TypeError(f"{type(model).__name__} was not built by peftseg.models.build_model")
    return facts


def added_params(model: nn.Module) -> dict[str, str]:
    """parameter name -> owning method, for every parameter a method added (names as the
    unwrapped model's `named_parameters()` gives them)."""
    facts = facts_of(model)
    return dict(facts.added) if facts is not None else {}


def group_of(name: str, family: FamilyMap | None, added: dict[str, str] | None = None) -> str:
    """Accounting group of a parameter; `added` is `added_params(model)`."""
    # method parameters first: a LoRA matrix inside backbone.net is `peft`, not backbone
    if added and name in added:
        return "peft"
    group = family.group_of(name) if family is not None else None
    return group if group in ACCOUNTING_GROUPS else "other"


def count_parameters(model: nn.Module) -> ParamCounts:
    # named_parameters() yields a shared (tied) parameter once
    return count_named(((name, p.numel(), p.requires_grad) for name, p in model.named_parameters()),
                       _family(model), added_params(model))


def _family(model: nn.Module) -> FamilyMap | None:
    facts = facts_of(model)
    return facts.family if facts is not None else None


def count_named(params, family: FamilyMap | None, added: dict[str, str]) -> ParamCounts:
    """ParamCounts of (name, numel, trainable) triples: a model's parameters, or a task variant's
    as its model loaded alone names them (peftseg.checkpoint.variants)."""
    by_group = {g: {"total": 0, "trainable": 0} for g in GROUPS}
    for name, numel, trainable in params:
        counts = by_group[group_of(name, family, added)]
        counts["total"] += numel
        if trainable:
            counts["trainable"] += numel
    total = sum(c["total"] for c in by_group.values())
    trainable = sum(c["trainable"] for c in by_group.values())
    return ParamCounts(
        total=total,
        trainable=trainable,
        ratio=trainable / total if total else 0.0,
        by_group=by_group,
    )
