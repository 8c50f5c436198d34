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


def unfreeze_task_layers(model: nn.Module) -> None:
    """What a PEFT method's `train_task_layers` trains: the family's task layers
    (FamilyMap.task_layers: neck + task heads on the R-CNN families, task heads elsewhere)."""
    unfreeze_groups(model, family_of(model).task_layers)


def unfreeze_after_backbone(model: nn.Module) -> None:
    """Everything but the backbone: neck, decoder and task heads (method `heads`)."""
    unfreeze_groups(model, [g for g in family_of(model).groups if g != "backbone"])


def train_only_added(model: nn.Module, added, owner: str, train_task_layers: bool) -> nn.Module:
    """The common ending of a PEFT method: record what it added, train exactly that (plus
    the family's task layers if asked)."""
    from peftseg.params import mark_added

    mark_added(model, added, owner)
    freeze_all(model)
    unfreeze_params(model, [id(p) for p in added])
    if train_task_layers:
        unfreeze_task_layers(model)
    return model
