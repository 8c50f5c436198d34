"""Method `bitfit`: only bias terms train (every bias of the model), plus the task heads."""

from __future__ import annotations

from dataclasses import dataclass

from peftseg.methods.freeze import freeze_all, unfreeze_task_heads
from peftseg.registry import register_method
from peftseg.methods._memory import MemoryOptions


@dataclass
class BitfitConfig(MemoryOptions):  # + base_dtype, blocks
    name: str = "bitfit"
    train_heads: bool = True


@register_method("bitfit", config=BitfitConfig, order=20, summary="every bias term trains, plus the task heads")
def apply(model, cfg: BitfitConfig):
    freeze_all(model)
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] == "bias":
            p.requires_grad_(True)
    if cfg.train_heads:
        unfreeze_task_heads(model)
    return model
