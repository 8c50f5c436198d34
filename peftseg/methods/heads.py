"""Method `heads`: backbone frozen, neck and heads train ("conventional fine-tuning")."""

from __future__ import annotations

from dataclasses import dataclass

from peftseg.methods.freeze import NECK_AND_HEADS, freeze_all, unfreeze_groups
from peftseg.registry import register_method
from peftseg.methods._memory import MemoryOptions


@dataclass
class HeadsConfig(MemoryOptions):  # + base_dtype, blocks
    name: str = "heads"


@register_method("heads", config=HeadsConfig, order=10,
                 summary="backbone frozen; neck and heads train (conventional fine-tuning)")
def apply(model, cfg: HeadsConfig):
    freeze_all(model)
    unfreeze_groups(model, NECK_AND_HEADS)
    return model
