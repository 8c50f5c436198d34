"""The shared freezing policy: freeze everything, then unfreeze by accounting group.

Groups are resolved through the model's FamilyMap, so no method names a module path.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from peftseg.errors import UserError
from peftseg.models import family_of

if TYPE_CHECKING:
    import torch.nn as nn

# what "train the heads" means for methods that keep the backbone frozen: the neck is
# randomly initialised (ViTDet's pyramid is not part of MAE weights), so it trains too
NECK_AND_HEADS = ("neck", "heads")


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def unfreeze_groups(model: nn.Module, groups: Iterable[str]) -> None:
    """Make trainable every parameter whose accounting group is in `groups`."""
    family = family_of(model)
    wanted = set(groups)
    unknown = wanted - set(family.groups)
    if unknown:
        raise UserError(
            f"parameter groups {sorted(unknown)} are not defined for model family "
            f"{family.name!r}; the groups it has are {sorted(family.groups)}."
        )
    for name, p in model.named_parameters():
        if family.group_of(name) in wanted:
            p.requires_grad_(True)


def unfreeze_params(model: nn.Module, param_ids: Iterable[int]) -> None:
    """Make trainable the parameters whose id() is listed (e.g. those a method added)."""
    ids = set(param_ids)
    for p in model.parameters():
        if id(p) in ids:
            p.requires_grad_(True)


def unfreeze_task_heads(model: nn.Module) -> None:
    """What a PEFT method's `train_heads` trains: the family's task heads (default: the
    neck and heads groups, which start untrained in the R-CNN families)."""
    family = family_of(model)
    if not family.task_heads:
        unfreeze_groups(model, NECK_AND_HEADS)
        return
    for name, p in model.named_parameters():
        if name.startswith(family.task_heads):
            p.requires_grad_(True)


def train_only_added(model: nn.Module, added, owner: str, train_heads: bool) -> nn.Module:
    """The common ending of a PEFT method: record what it added, train exactly that (plus
    the family's task heads if asked)."""
    from peftseg.params import mark_added

    mark_added(model, added, owner)
    freeze_all(model)
    unfreeze_params(model, [id(p) for p in added])
    if train_heads:
        unfreeze_task_heads(model)
    return model
