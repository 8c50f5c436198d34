"""Method `lora`: low-rank updates on named target groups, through HF peft.

Targets are group names (`attn_qkv`, `attn_proj`, `mlp`, …) that the model's FamilyMap
turns into module-name regexes; peft matches their union with `re.fullmatch`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import peft
import torch.nn as nn

from peftseg.errors import UserError
from peftseg.methods.freeze import NECK_AND_HEADS, freeze_all, unfreeze_groups, unfreeze_params
from peftseg.models import family_of
from peftseg.models.family import FamilyMap


@dataclass
class LoraConfig:
    name: str = "lora"
    rank: int = 8
    alpha: float = 8.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attn_qkv", "attn_proj"])
    train_heads: bool = True  # neck + heads train next to LoRA (they start untrained)


def _validate(cfg: LoraConfig) -> None:
    if isinstance(cfg.rank, bool) or not isinstance(cfg.rank, int) or cfg.rank <= 0:
        raise UserError(
            f"method.rank must be a positive integer (got {cfg.rank!r}); it is the rank of "
            "each LoRA update, e.g. method.rank=8."
        )
    if not cfg.alpha > 0:
        raise UserError(
            f"method.alpha must be greater than 0 (got {cfg.alpha!r}); LoRA scales its update "
            "by alpha/rank, and alpha equal to the rank (scale 1) is a common choice."
        )
    if not 0.0 <= cfg.dropout < 1.0:
        raise UserError(
            f"method.dropout must be in [0, 1) (got {cfg.dropout!r}); it is the dropout "
            "probability on the LoRA input, 0 to disable."
        )


def resolve_targets(model: nn.Module, family: FamilyMap, targets: list[str]) -> list[str]:
    """Full names of the modules the target groups select; UserError for anything peft
    could not wrap the way LoRA means."""
    known = ", ".join(family.lora_targets)
    if not targets:
        raise UserError(
            f"method.targets is empty; list at least one target group of family "
            f"{family.name!r}: {known}."
        )
    unknown = [t for t in targets if t not in family.lora_targets]
    if unknown:
        raise UserError(
            f"method.targets names {unknown}, which model family {family.name!r} does not "
            f"define; the target groups it has are: {known}."
        )
    modules = dict(model.named_modules())
    chosen: list[str] = []
    for group in targets:
        pattern = family.lora_targets[group]
        hits = [n for n in modules if re.fullmatch(pattern, n)]
        if not hits:
            raise UserError(
                f"method.targets group {group!r} (pattern {pattern!r}) matches no module of "
                f"this {family.name} model; the target groups of this family are: {known}."
            )
        for name in hits:
            _check_wrappable(name, modules[name], group)
        chosen += [n for n in hits if n not in chosen]
    return chosen


def _check_wrappable(name: str, module: nn.Module, group: str) -> None:
    if isinstance(module, nn.Linear):
        return
    if isinstance(module, nn.Conv2d) and (
        getattr(module, "norm", None) is not None or getattr(module, "activation", None) is not None
    ):
        raise UserError(
            f"method.targets group {group!r} selects {name}, a detectron2 Conv2d that applies its "
            "own norm/activation inside forward, so peft would add the LoRA update after the "
            "norm instead of to the convolution; only nn.Linear layers are supported as LoRA "
            "targets here, so drop this group from method.targets."
        )
    raise UserError(
        f"method.targets group {group!r} selects {name}, a {type(module).__name__}; only "
        "nn.Linear layers are supported as LoRA targets here, so drop this group from "
        "method.targets."
    )


def apply(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    _validate(cfg)
    family = family_of(model)
    targets = list(cfg.targets)
    resolve_targets(model, family, targets)
    before = {id(p) for p in model.parameters()}
    peft_cfg = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules="|".join(f"(?:{family.lora_targets[t]})" for t in targets),
        bias="none",
    )
    model = peft.inject_adapter_in_model(peft_cfg, model)
    added = [id(p) for p in model.parameters() if id(p) not in before]
    freeze_all(model)
    unfreeze_params(model, added)
    if cfg.train_heads:
        unfreeze_groups(model, NECK_AND_HEADS)
    return model
