"""Combinations: several methods in one run (e.g. `adapter_lora`), trainable = their union.

Each part is applied with its own config; a parameter trains if any part trains it.
Adapters go in before LoRA: adapter widths are read from a site's Linear layers, which
must not yet contain LoRA's inner A/B Linears.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from peftseg.methods.adapter import AdapterConfig
from peftseg.methods.freeze import freeze_all, unfreeze_params
from peftseg.methods.lora import LoraConfig


@dataclass
class AdapterLoraConfig:
    name: str = "adapter_lora"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


def combine(model: nn.Module, parts: list[Any]) -> nn.Module:
    from peftseg.methods import apply_method  # the registry imports this module

    trainable: set[int] = set()
    for part in parts:
        model = apply_method(model, part)
        trainable |= {id(p) for p in model.parameters() if p.requires_grad}
    freeze_all(model)
    unfreeze_params(model, trainable)
    return model


def apply(model: nn.Module, cfg: AdapterLoraConfig) -> nn.Module:
    return combine(model, [cfg.adapter, cfg.lora])
