"""Activation checkpointing (`train.activation_checkpointing`): each transformer block the
model's FamilyMap lists (`checkpoint_blocks`) keeps only its input during the forward and
is recomputed in backward, trading one extra block forward for the block's activations.

torch's non-reentrant `torch.utils.checkpoint.checkpoint` does the work. Not the reentrant
one detectron2's Swin offers (`use_checkpoint`): a reentrant checkpoint returns an output
that needs no grad when the block's input needs none, so a frozen backbone with LoRA or
adapters inside would silently get no gradients. The non-reentrant one records the
recomputation per saved tensor, so it also works with whatever a method put inside the
block (peft layers, adapter hooks), with keyword arguments, under autocast and with DDP,
and it restores the RNG state so drop path and dropout draw the same masks again.

The wrapper is installed as an instance-level `forward` bound to the block (a
`types.MethodType` of a module-level function), so detectron2's and transformers' classes
stay untouched, hooks registered on the block still run once per call, and
`copy.deepcopy` of the model rebinds it to the copy.
"""

from __future__ import annotations

import re
import types

import torch.nn as nn

def _is_checkpointed(block: nn.Module) -> bool:
    """Whether the block runs _checkpointed_forward: read from the block's own forward, so no
    marker attribute is needed to tell (and none can disagree with it)."""
    forward = block.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _checkpointed_forward


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    import torch
    from torch.utils.checkpoint import checkpoint

    forward = type(self).forward
    # only while training with autograd on: evaluation has nothing to recompute
    if self.training and torch.is_grad_enabled():
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


def checkpoint_block_names(model: nn.Module) -> list[str]:
    """Names of the modules the family lists as checkpointable, in module order."""
    from peftseg.models import family_of

    patterns = family_of(model).checkpoint_blocks
    return [n for n, _ in model.named_modules() if any(re.fullmatch(p, n) for p in patterns)]


def enable_activation_checkpointing(model: nn.Module) -> list[str]:
    """Recompute every block of `checkpoint_blocks` in backward; returns their names.

    Idempotent. Raises UserError when the family declares no blocks (a knob that would
    silently do nothing is worse than a refusal)."""
    from peftseg.errors import UserError
    from peftseg.models import family_of

    names = checkpoint_block_names(model)
    if not names:
        family = family_of(model)
        raise UserError(
            f"train.activation_checkpointing=true, but model family {family.name!r} lists no "
            "checkpointable blocks (FamilyMap.checkpoint_blocks) or none matches this model; "
            "set train.activation_checkpointing=false for this model."
        )
    modules = dict(model.named_modules())
    for name in names:
        block = modules[name]
        if not _is_checkpointed(block):
            block.forward = types.MethodType(_checkpointed_forward, block)
    return names


def disable_activation_checkpointing(model: nn.Module) -> None:
    """Undo `enable_activation_checkpointing` (the class's forward runs again)."""
    for block in model.modules():
        if _is_checkpointed(block):
            del block.forward
