"""Method `heads`: backbone frozen; everything after it (neck, decoder, task heads) trains —
the "conventional fine-tuning" baseline."""

from __future__ import annotations

from dataclasses import dataclass

from peftseg.methods.freeze import freeze_all, unfreeze_after_backbone
from peftseg.registry import register_method
from peftseg.methods.options import MemoryOptions


@dataclass
class HeadsConfig(MemoryOptions):  # + base_dtype, blocks
    name: str = "heads"


@register_method("heads", config=HeadsConfig, colour="#ff7f0e", order=10,
                 summary="backbone frozen; neck, decoder and task heads train (conventional fine-tuning)")
def apply(model, cfg: HeadsConfig):
    freeze_all(model)
    unfreeze_after_backbone(model)
    return model
