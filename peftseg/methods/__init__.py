"""PEFT methods: one module per method, each exposing `apply(model, cfg) -> model`."""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from peftseg.errors import UserError
from peftseg.methods import adapter, bitfit, combine, full, heads, ia3, loha, lokr, lora

METHODS: dict[str, Callable[[nn.Module, Any], nn.Module]] = {
    "full": full.apply,
    "heads": heads.apply,
    "lora": lora.apply,
    "loha": loha.apply,
    "lokr": lokr.apply,
    "ia3": ia3.apply,
    "bitfit": bitfit.apply,
    "adapter": adapter.apply,
    "adapter_lora": combine.apply,
}

__all__ = ["METHODS", "apply_method"]


def apply_method(model: nn.Module, cfg_method: Any) -> nn.Module:
    """Set which parameters train (and insert method modules) for `cfg_method.name`."""
    name = cfg_method.name
    if name not in METHODS:
        raise UserError(
            f"method.name={name!r} is not a known method; choose one of {sorted(METHODS)} "
            "(e.g. method=lora)."
        )
    return METHODS[name](model, cfg_method)
