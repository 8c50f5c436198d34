"""Method `bitfit`: only bias terms train (every bias of the model), plus the task heads."""

from __future__ import annotations

from dataclasses import dataclass

from peftseg.methods.freeze import freeze_all, unfreeze_task_layers
from peftseg.registry import register_method
from peftseg.methods.options import PeftOptions


@dataclass
class BitfitConfig(PeftOptions):  # + base_dtype, blocks, train_task_layers
    name: str = "bitfit"


@register_method("bitfit", config=BitfitConfig, colour="#2ca02c", order=20, summary="every bias term trains, plus the task heads")
def apply(model, cfg: BitfitConfig):
    freeze_all(model)
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] == "bias":
            p.requires_grad_(True)
    if cfg.train_task_layers:
        unfreeze_task_layers(model)
    return model
