"""Parameter accounting: total, trainable, ratio, and the same per group.

The ratio is over the model as run, method modules included, so LoRA's own parameters
count in the denominator too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.nn as nn

from peftseg.models.family import ACCOUNTING_GROUPS, FamilyMap

GROUPS = (*ACCOUNTING_GROUPS, "peft", "other")

# parameter-name fragments of modules that methods insert: peft's LoRA/DoRA (lora_A,
# lora_B, lora_magnitude_vector), LoHa (hada_*), LoKr (lokr_*), IA3 (ia3_l) and the
# project's bottleneck adapters (peft_adapters.*); a new method adds its own here
PEFT_NAME_MARKERS: tuple[str, ...] = ("lora_", "hada_", "lokr_", "ia3_", "peft_adapters.")


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int
    ratio: float
    by_group: dict[str, dict[str, int]]

    def to_dict(self) -> dict:
        return asdict(self)


def mark_added(model: nn.Module, params, owner: str) -> None:
    """Record parameters a method inserted (called by the method, at injection, when their
    ids are known): accounting, learning-rate groups and checkpoints read this record
    instead of guessing from parameter names."""
    owned = model.__dict__.setdefault("peftseg_added", {})  # plain attribute: not in state_dict
    for p in params:
        owned[id(p)] = owner


def added_param_ids(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> owning method, for every parameter a method added (DDP-aware)."""
    inner = getattr(model, "module", model) if not hasattr(model, "peftseg_added") else model
    return dict(getattr(inner, "peftseg_added", {}))


def group_of(name: str, family: FamilyMap | None) -> str:
    # method parameters first: a LoRA matrix inside backbone.net is `peft`, not backbone
    if any(m in name for m in PEFT_NAME_MARKERS):
        return "peft"
    group = family.group_of(name) if family is not None else None
    return group if group in ACCOUNTING_GROUPS else "other"


def count_parameters(model: nn.Module) -> ParamCounts:
    family = getattr(model, "peftseg_family", None)
    by_group = {g: {"total": 0, "trainable": 0} for g in GROUPS}
    # named_parameters() yields a shared (tied) parameter once
    for name, p in model.named_parameters():
        counts = by_group[group_of(name, family)]
        counts["total"] += p.numel()
        if p.requires_grad:
            counts["trainable"] += p.numel()
    total = sum(c["total"] for c in by_group.values())
    trainable = sum(c["trainable"] for c in by_group.values())
    return ParamCounts(
        total=total,
        trainable=trainable,
        ratio=trainable / total if total else 0.0,
        by_group=by_group,
    )
