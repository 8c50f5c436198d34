"""Keep the frozen base of a peft LoRA on nn.MultiheadAttention exactly as it was.

peft's LoRA for nn.MultiheadAttention (its `in_proj_weight` is a bare Parameter that no
Linear forward reads) merges the update into the base weights before every forward and
unmerges it after: W' = (W + dW) - dW, registered as a new Parameter. In floating point that
is not W: the frozen base drifts by a few ulps per step (so a checkpoint no longer matches the
base fingerprint it was saved with, and `peftseg eval`/`merge` refuse it), and the base
Parameter objects change identity on every call.

A pre-hook keeps the base Parameters, a forward hook puts those same objects back after
peft's unmerge: the base is bit-for-bit and object-for-object the one the method froze. The
forward itself (merged weights, gradients to lora_A/lora_B through them) is peft's, untouched.
Hooks are module-level functions, so deepcopy and pickle of the model keep working.
"""

from __future__ import annotations

import torch.nn as nn

_MARK = "peftseg_mha_pinned"
_SLOT = "_peftseg_mha_base"


def _stash(module: nn.Module, args) -> None:
    if module.merged:  # merged on purpose (merge and unload): peft owns the weights then
        return
    base = module.get_base_layer()
    module.__dict__[_SLOT] = (base.in_proj_weight, base.out_proj.get_base_layer().weight)


def _restore(module: nn.Module, args, output):
    pinned = module.__dict__.pop(_SLOT, None)
    if pinned is None or module.merged:
        return output
    in_proj, out_proj = pinned
    base = module.get_base_layer()
    del base.in_proj_weight
    base.register_parameter("in_proj_weight", in_proj)
    linear = base.out_proj.get_base_layer()
    del linear.weight
    linear.register_parameter("weight", out_proj)
    return output


def pin_multihead_attention_bases(model: nn.Module) -> int:
    """Hook every peft LoRA MultiheadAttention of `model` (idempotent); returns how many."""
    from peft.tuners.lora.layer import MultiheadAttention

    count = 0
    for module in model.modules():
        if isinstance(module, MultiheadAttention) and not getattr(module, _MARK, False):
            module.register_forward_pre_hook(_stash)
            module.register_forward_hook(_restore)
            setattr(module, _MARK, True)
            count += 1
    return count
