"""Activation checkpointing (`train.activation_checkpointing`, `train.checkpoint_parts`): the
modules the model's FamilyMap lists for each named part keep only their inputs during the
forward and are recomputed in backward, trading one extra forward of each for its activations.

Parts (CHECKPOINT_PARTS): `blocks`, the transformer blocks/layers of
`FamilyMap.checkpoint_blocks` (what `train.activation_checkpointing=true` alone has always
meant); `mlp`, only the MLP of each backbone block (its 4x-wide hidden activations are most of
what a block stores, and recomputing it costs a fraction of a block); `neck`, the
`FamilyMap.checkpoint_neck` modules (SimpleFeaturePyramid's per-scale stages, an FPN's convs,
a pixel decoder's convs); `heads`, the `FamilyMap.checkpoint_heads` modules (the RPN head, the
ROI box head and the mask head's conv stack, a query decoder's prediction heads). Each part
is listed at a granularity whose modules take tensors (or lists of them) and compute no loss:
a whole ROI-heads module takes Instances and samples proposals, so it is its box head and
mask convs that are listed.

torch's non-reentrant `torch.utils.checkpoint.checkpoint` does the work. Not the reentrant
one detectron2's Swin offers (`use_checkpoint`): a reentrant checkpoint returns an output
that needs no grad when the block's input needs none, so a frozen backbone with LoRA or
adapters inside would silently get no gradients. The non-reentrant one records the
recomputation per saved tensor, so it also works with whatever a method put inside the
block (peft layers, adapter hooks), with keyword arguments and list arguments, under
autocast and with DDP, and it restores the RNG state so drop path and dropout draw the same
masks again.

The wrapper is installed as an instance-level `forward` bound to the module (a
`types.MethodType` of a module-level function), so detectron2's and transformers' classes
stay untouched, hooks registered on the module still run once per call, and
`copy.deepcopy` of the model rebinds it to the copy.
"""

from __future__ import annotations

import re
import types

import torch.nn as nn

from peftseg.config import CHECKPOINT_PARTS, check_checkpoint_parts  # noqa: F401 (re-exported)

DEFAULT_PARTS = ("blocks",)


def _is_checkpointed(block: nn.Module, method: str = "forward") -> bool:
    """Whether the block's `method` runs a checkpointed wrapper: read from the block's own
    attribute, so no marker attribute is needed to tell (and none can disagree with it)."""
    bound = block.__dict__.get(method)
    return getattr(bound, "__func__", None) is _WRAPPERS.get(method)


def _checkpointed(self: nn.Module, method: str, args, kwargs):
    import torch
    from torch.utils.checkpoint import checkpoint

    fn = getattr(type(self), method)
    # only while training with autograd on: evaluation has nothing to recompute
    if self.training and torch.is_grad_enabled():
        return checkpoint(fn, self, *args, use_reentrant=False, **kwargs)
    return fn(self, *args, **kwargs)


# One module-level function per method a FamilyMap pattern may name (`REGEX:method`), so that
# the bound wrapper deep-copies onto the copy and pickles by name.
def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    return _checkpointed(self, "forward", args, kwargs)


def _checkpointed_layers(self: nn.Module, *args, **kwargs):
    # detectron2's MaskRCNNConvUpsampleHead.layers: the conv stack without the loss, which
    # its forward computes from Instances
    return _checkpointed(self, "layers", args, kwargs)


def _checkpointed_prediction_heads(self: nn.Module, *args, **kwargs):
    # a query decoder's class/mask prediction (the per-layer mask logits are its big tensors)
    return _checkpointed(self, "prediction_heads", args, kwargs)


_WRAPPERS = {"forward": _checkpointed_forward, "layers": _checkpointed_layers,
             "prediction_heads": _checkpointed_prediction_heads}


def _split(pattern: str) -> tuple[str, str]:
    """`REGEX` or `REGEX:method` -> (regex, method); the method defaults to forward."""
    found = re.fullmatch(r"(.*):([A-Za-z_]\w*)", pattern)  # a regex's own "(?:" is no method
    if not found:
        return pattern, "forward"
    if found[2] not in _WRAPPERS:
        raise ValueError(f"checkpoint pattern {pattern!r}: no wrapper for method {found[2]!r}")
    return found[1], found[2]


def part_patterns(family, part: str) -> tuple[str, ...]:
    """The regexes (fullmatched against module names) the family declares for one part."""
    if part == "blocks":
        return tuple(family.checkpoint_blocks)
    if part == "mlp":
        site = family.adapter_sites.get("mlp", "")
        return (site,) if site and family.backbone_blocks else ()
    if part == "neck":
        return tuple(family.checkpoint_neck)
    if part == "heads":
        return tuple(family.checkpoint_heads)
    raise ValueError(f"unknown checkpoint part {part!r}")


def _targets(model: nn.Module, parts) -> list[tuple[str, str]]:
    """(module name, method) of every module the family lists for `parts`, in module order;
    a module inside another one whose whole forward is listed is left out (the outer
    recomputation covers it)."""
    from peftseg.models import family_of

    family = family_of(model)
    patterns = [(part, *_split(p)) for part in parts for p in part_patterns(family, part)]

    def listed(name: str, part: str, regex: str) -> bool:
        if not re.fullmatch(regex, name):
            return False
        # mlp: the adapter site's MLPs inside backbone blocks only (a query family's encoder
        # and decoder layers name theirs too, as single Linears)
        return part != "mlp" or re.fullmatch(family.backbone_blocks, name.rpartition(".")[0]) is not None

    found = [(n, method) for n, _ in model.named_modules()
             for part, regex, method in patterns if listed(n, part, regex)]
    kept: list[tuple[str, str]] = []
    for name, method in found:  # module order: an enclosing module comes before what it holds
        if not any(name.startswith(outer + ".") for outer, m in kept if m == "forward"):
            kept.append((name, method))
    return kept


def checkpoint_block_names(model: nn.Module, parts=DEFAULT_PARTS) -> list[str]:
    """Names of the modules recomputed for `parts`, in module order (`name:method` where a
    method other than forward is recomputed)."""
    return [name if method == "forward" else f"{name}:{method}" for name, method in _targets(model, parts)]


def enable_activation_checkpointing(model: nn.Module, parts=DEFAULT_PARTS) -> list[str]:
    """Recompute every module of `parts` in backward; returns their names.

    Idempotent. Raises UserError when the family declares no module for a part, or none
    matches this model (a knob that would silently do nothing is worse than a refusal)."""
    from peftseg.errors import UserError
    from peftseg.models import family_of

    parts = check_checkpoint_parts(parts)
    family = family_of(model)
    for part in parts:
        if not checkpoint_block_names(model, (part,)):
            raise UserError(
                f"train.activation_checkpointing=true with train.checkpoint_parts={list(parts)}, but model "
                f"family {family.name!r} lists no checkpointable modules for the part {part!r} (FamilyMap."
                f"{'checkpoint_blocks' if part == 'blocks' else 'adapter_sites[mlp]' if part == 'mlp' else 'checkpoint_' + part}) "
                f"or none matches this model; leave {part!r} out of train.checkpoint_parts, or set "
                "train.activation_checkpointing=false for this model."
            )
    modules = dict(model.named_modules())
    for name, method in _targets(model, parts):
        block = modules[name]
        if not _is_checkpointed(block, method):
            setattr(block, method, types.MethodType(_WRAPPERS[method], block))
    return checkpoint_block_names(model, parts)


def disable_activation_checkpointing(model: nn.Module) -> None:
    """Undo `enable_activation_checkpointing` (the class's forward runs again)."""
    for block in model.modules():
        for method in _WRAPPERS:
            if _is_checkpointed(block, method):
                delattr(block, method)
