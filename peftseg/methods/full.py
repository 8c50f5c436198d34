"""Method `full`: every parameter trains (the upper-bound baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from peftseg.methods.freeze import unfreeze_all


@dataclass
class FullConfig:
    name: str = "full"


def apply(model: nn.Module, cfg: FullConfig) -> nn.Module:
    unfreeze_all(model)
    return model
