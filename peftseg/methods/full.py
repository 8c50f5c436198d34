"""Method `full`: every parameter trains (the upper-bound baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from peftseg.methods.freeze import unfreeze_all
from peftseg.registry import register_method
from peftseg.methods.options import MemoryOptions


@dataclass
class FullConfig(MemoryOptions):  # + base_dtype, blocks
    name: str = "full"


@register_method("full", config=FullConfig, colour="#1f77b4", trains_everything=True, order=0, summary="every parameter trains (the upper-bound baseline)")
def apply(model, cfg: FullConfig):
    unfreeze_all(model)
    return model
