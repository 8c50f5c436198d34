"""Method `bitfit`: only bias terms train (every bias of the model), plus the task heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from peftseg.methods.freeze import freeze_all, unfreeze_task_heads


@dataclass
class BitfitConfig:
    name: str = "bitfit"
    train_heads: bool = True


def apply(model: nn.Module, cfg: BitfitConfig) -> nn.Module:
    freeze_all(model)
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] == "bias":
            p.requires_grad_(True)
    if cfg.train_heads:
        unfreeze_task_heads(model)
    return model
