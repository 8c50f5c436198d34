"""Model families: one module each, registering itself (peftseg.registry), and the builder.

A family module declares its config dataclass, its FamilyMap and `build(cfg, num_classes)`
under `@register_family`; this package finds them by importing every public module in it
(modules named `_*` hold heavy implementation and are imported only when used).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from peftseg.errors import UserError
from peftseg.models.family import FACTS_ATTR, FamilyMap, ModelFacts, facts_of
from peftseg.registry import FAMILIES, check_config

__all__ = ["FAMILIES", "FamilyMap", "ModelFacts", "build_model", "facts_of", "family_of"]

log = logging.getLogger(__name__)


def build_model(cfg_model: Any, num_classes: int, class_names: Sequence[str] | None = None):
    """Build the family's detectron2 model, load `cfg_model.weights` if set, attach its map.

    A model that classifies by class name (it has `set_class_names`, e.g. seem's text-space
    classifier) is given `class_names` after its weights are loaded; without them it gets
    placeholder names ("class 0", …) and a warning: its classifier then starts from
    embeddings of meaningless text."""
    spec = FAMILIES.get(cfg_model.family)
    check_config(cfg_model)
    if int(num_classes) < 1:
        raise UserError(
            f"the dataset declares {num_classes} classes; a detector needs at least one "
            "foreground class, so check the dataset's category list."
        )
    model = spec.build(cfg_model, int(num_classes))
    # set before loading weights so the loader can ask the model for its family; a family that
    # reads its own checkpoint format in build (mask2former: a transformers directory) attached
    # facts with the weights' report already: everything else loads through detectron2's
    facts = facts_of(model) or ModelFacts(spec.family_map)
    setattr(model, FACTS_ATTR, facts)
    if cfg_model.weights and facts.weights is None:
        from peftseg.models._weights import load_weights

        facts.weights = load_weights(model, cfg_model.weights)  # what loaded: predict/eval check it
    if hasattr(model, "set_class_names"):
        if class_names is None:
            log.warning("%s: no class names given; the text classifier uses placeholder names", spec.name)
            class_names = [f"class {i}" for i in range(int(num_classes))]
        elif len(class_names) != int(num_classes):
            raise UserError(f"{len(class_names)} class names for {num_classes} classes: {list(class_names)}")
        model.set_class_names([str(n) for n in class_names])
    return model


def family_of(model) -> FamilyMap:
    """The FamilyMap of a model build_model made (looks through DDP-style `.module` wrappers)."""
    facts = facts_of(model)
    if facts is None:
        raise TypeError(f"{type(model).__name__} was not built by peftseg.models.build_model")
    return facts.family
