"""How the project's own methods hang their modules on a model, and take them off again.

A method of its own (adapter, mona, side) leaves detectron2's and transformers' classes as
they are: it sets its module as an attribute of a model module (the host: `peft_adapters`,
`peft_mona`, `peft_side`) and registers forward hooks that read it. `Attached` is that module's
side of the bargain: `attach(host)` does both, `detach(host)` undoes both — the hooks through
the RemovableHandles their registration returned, the attribute with delattr — and leaves the
host as it was. Task variants on one base (peftseg.checkpoint.variants) switch with these two
calls; `remove_adapters`/`remove_mona` take a method off a model with them.
"""

from __future__ import annotations

import torch.nn as nn
from torch.utils.hooks import RemovableHandle


class Attached:
    """Mixin of an nn.Module that lives on a host module as `host.<slot>` and works through
    hooks it registers on the host (or the host's submodules)."""

    slot: str = ""  # the host's attribute that holds the module

    def register_hooks(self, host: nn.Module) -> list[RemovableHandle]:
        """Register the module's hooks on `host`; the handles they return."""
        raise NotImplementedError

    def attach(self, host: nn.Module) -> None:
        setattr(host, self.slot, self)
        # a plain list attribute (not a submodule): deepcopy and pickle of the model keep the
        # handles pointing at the copy's own hook dicts
        self.hook_handles = self.register_hooks(host)

    def detach(self, host: nn.Module) -> None:
        for handle in getattr(self, "hook_handles", ()):
            handle.remove()
        self.hook_handles = []
        delattr(host, self.slot)


def attached_modules(model: nn.Module) -> dict[str, tuple[nn.Module, Attached]]:
    """Every Attached module on `model`: "<host name>.<slot>" -> (host, module)."""
    found = {}
    for host_name, host in model.named_modules():
        for slot, child in host.named_children():
            if isinstance(child, Attached):
                found[f"{host_name}.{slot}" if host_name else slot] = (host, child)
    return found
