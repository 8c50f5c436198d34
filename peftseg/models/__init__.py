"""Model builders by family, and the family map methods rely on."""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from peftseg.errors import UserError
from peftseg.models import mask2former, swin, vitdet
from peftseg.models.family import FamilyMap
from peftseg.models.weights import load_weights

# family name -> (build(cfg, num_classes), its FamilyMap)
FAMILIES: dict[str, tuple[Callable[[Any, int], nn.Module], FamilyMap]] = {
    "vitdet": (vitdet.build, vitdet.FAMILY),
    "mask2former": (mask2former.build, mask2former.FAMILY),
    "swin": (swin.build, swin.FAMILY),
}

__all__ = ["FAMILIES", "FamilyMap", "build_model", "family_of"]


def build_model(cfg_model: Any, num_classes: int) -> nn.Module:
    """Build the family's detectron2 model, load `cfg_model.weights` if set, attach its map."""
    family = cfg_model.family
    if family not in FAMILIES:
        raise UserError(
            f"model.family={family!r} is not a known model family; choose one of "
            f"{sorted(FAMILIES)} (e.g. model=vitdet_tiny)."
        )
    if int(num_classes) < 1:
        raise UserError(
            f"the dataset declares {num_classes} classes; a detector needs at least one "
            "foreground class, so check the dataset's category list."
        )
    build, family_map = FAMILIES[family]
    model = build(cfg_model, int(num_classes))
    # a plain attribute, not a submodule: state_dict and .to() ignore it; set before
    # loading weights so the loader can ask the model for its family
    model.peftseg_family = family_map
    # a family that reads its own checkpoint format in build (mask2former: a transformers
    # directory) leaves its report on the model; everything else goes through detectron2's
    if cfg_model.weights and getattr(model, "weights_report", None) is None:
        load_weights(model, cfg_model.weights)
    return model


def family_of(model: nn.Module) -> FamilyMap:
    """The FamilyMap attached by build_model (looks through DDP-style `.module` wrappers)."""
    found = getattr(model, "peftseg_family", None)
    if found is None and isinstance(getattr(model, "module", None), nn.Module):
        found = getattr(model.module, "peftseg_family", None)
    if found is None:
        raise TypeError(f"{type(model).__name__} was not built by peftseg.models.build_model")
    return found
