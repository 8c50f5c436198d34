"""PEFT methods: one module per method, each registering itself (peftseg.registry).

A method module declares its config dataclass and `apply(model, cfg) -> model` under
`@register_method`; this package finds them by importing every public module in it
(modules named `_*` hold heavy implementation and are imported only when used). A method
that injects peft adapters takes their name too: `apply(model, cfg, adapter_name="default")`.
"""

from __future__ import annotations

import inspect
from typing import Any

from peftseg.registry import METHODS, check_config

__all__ = ["METHODS", "apply_method"]


def apply_method(model, cfg_method: Any, adapter_name: str = "default"):
    """Set which parameters train (and insert method modules) for `cfg_method.name`.
    `adapter_name`: the name of the peft adapter a peft-backed method injects ("default" for a
    run; each task variant's own when several share one model, peftseg.checkpoint.variants)."""
    spec = METHODS.get(cfg_method.name)
    check_config(cfg_method)
    from peftseg.methods.options import check_blocks_read, store_frozen_in

    check_blocks_read(spec.name, getattr(cfg_method, "blocks", "all"))
    named = "adapter_name" in inspect.signature(spec.apply).parameters
    model = spec.apply(model, cfg_method, adapter_name=adapter_name) if named else spec.apply(model, cfg_method)
    _freeze_family_frozen(model)
    # after the method: its own (trainable) parameters are created fp32 and stay so
    store_frozen_in(model, getattr(cfg_method, "base_dtype", "fp32"), spec.name)
    return model


def _freeze_family_frozen(model) -> None:
    """What the family never trains (FamilyMap.frozen) stays frozen whatever the method did."""
    from peftseg.models import family_of

    frozen = family_of(model).frozen
    if frozen:
        for name, p in model.named_parameters():
            if name.startswith(frozen):
                p.requires_grad_(False)
