"""Keep the frozen base of a peft LoRA on nn.MultiheadAttention exactly as it was.

peft's LoRA for nn.MultiheadAttention (its `in_proj_weight` is a bare Parameter that no
Linear forward reads) merges the update into the base weights before every forward and
unmerges it after. Under peft 0.22 (the version this module is written for, pinned in
pyproject.toml and the lock):
- in_proj: the base Parameter is replaced by the tensor W + dW, and after the forward by a new
  Parameter (W + dW) - dW, which in floating point is not W;
- out_proj: `out_proj.merge()` adds dW *in place* into the base Parameter's data, which is then
  swapped for a separately computed W + dW; the unmerge registers (W + dW) - dW as a new
  Parameter. The Parameter the method froze keeps the in-place W + dW.
Left alone, the frozen base drifts every step (a checkpoint no longer matches the base
fingerprint it was saved with, so `peftseg eval`/`merge` refuse it) and the base Parameter
objects change identity on every call.

A pre-hook keeps the base Parameters and lends peft a copy of the out_proj weight to write
into; a forward hook puts the kept Parameters back after peft's unmerge. The base is then
bit-for-bit and object-for-object the one the method froze. The forward itself (W + dW for both
projections, gradients to lora_A/lora_B through them) is peft's, untouched. The copy is one
d_model x d_model matrix per attention layer and forward. Hooks are module-level functions,
so deepcopy and pickle of the model keep working.
"""

from __future__ import annotations

import torch.nn as nn

_MARK = "peftseg_mha_pinned"
_SLOT = "_peftseg_mha_base"


def _stash(module: nn.Module, args) -> None:
    if module.merged:  # merged on purpose (merge and unload): peft owns the weights then
        return
    base = module.get_base_layer()
    linear = base.out_proj.get_base_layer()
    module.__dict__[_SLOT] = (base.in_proj_weight, linear.weight)
    # peft's out_proj.merge() writes W + dW into this Parameter's data in place: give it a copy
    lent = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
    del linear.weight
    linear.register_parameter("weight", lent)


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
