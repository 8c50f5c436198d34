"""Method `bitfit`: only bias terms train (every bias of the model), plus neck and heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from peftseg.methods.freeze import NECK_AND_HEADS, freeze_all, unfreeze_groups


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
        unfreeze_groups(model, NECK_AND_HEADS)
    return model
