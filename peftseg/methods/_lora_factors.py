"""LoRA's factor pairs in a model, for the optimisers that treat A and B differently
(train.optimizer=loraplus | lorafa, peftseg.engine.optim) and LoRA-FA's frozen A."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from peft.tuners.lora import LoraLayer


@dataclass(frozen=True)
class FactorPair:
    layer: str  # the LoRA layer's module name
    adapter: str
    a: nn.Parameter
    b: nn.Parameter
    scaling: float
    dora: bool  # the layer also learns DoRA's magnitude for this adapter


def lora_pairs(model: nn.Module) -> list[FactorPair]:
    """Every (A, B) of every peft LoRA layer (nn.MultiheadAttention's in_proj and its inner
    out_proj are layers of their own), in module order."""
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.lora_A:
            pairs.append(FactorPair(name, adapter, module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                                    module.scaling[adapter], adapter in getattr(module, "lora_magnitude_vector", {})))
    return pairs


def freeze_lora_a(model: nn.Module) -> int:
    """LoRA-FA trains B only: A stays at its start (saved with the checkpoint all the same,
    peftseg.checkpoint.files.trainable_state). Returns how many A tensors were frozen."""
    pairs = lora_pairs(model)
    for pair in pairs:
        pair.a.requires_grad_(False)
    return len(pairs)
