"""Method `heads`: backbone frozen, neck and heads train ("conventional fine-tuning")."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from peftseg.methods.freeze import NECK_AND_HEADS, freeze_all, unfreeze_groups


@dataclass
class HeadsConfig:
    name: str = "heads"


def apply(model: nn.Module, cfg: HeadsConfig) -> nn.Module:
    freeze_all(model)
    unfreeze_groups(model, NECK_AND_HEADS)
    return model
