"""Fold a trained method into the base weights: a plain detectron2 model, no extra modules.

peft's layers merge their own update (LoRA/DoRA/LoHa/LoKr/IA3) into the wrapped layer;
we then put the wrapped layer back in its parent's place, as peft's unload does.
Bottleneck adapters are non-linear and have no merged form.
"""

from __future__ import annotations

import torch.nn as nn
from peft.tuners.tuners_utils import BaseTunerLayer

from peftseg.errors import UserError


def merge_and_unload(model: nn.Module) -> nn.Module:
    adapted = [n for n, m in model.named_modules() if hasattr(m, "peft_adapters")]
    if adapted:
        raise UserError(
            f"this model carries bottleneck adapters (e.g. at {adapted[0]}); they are non-linear, so they "
            "cannot be folded into the base weights. Merge works for lora, loha, lokr and ia3; evaluate an "
            "adapter run with `peftseg eval` instead."
        )
    tuner_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in tuner_layers:
        layer.merge(safe_merge=True)  # safe_merge: refuse NaN/inf instead of writing them
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):  # set by peft.inject_adapter_in_model
        del model.peft_config
    return model
