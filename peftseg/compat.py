"""Every use of a dependency's private API, in one place, each with why no public one serves.
tests/test_compat.py checks each against the installed version, so a dependency that changes
one fails there by name, not somewhere in a run.
"""

from __future__ import annotations

import contextlib
import contextvars


# --- detectron2 -----------------------------------------------------------------------------
# SimpleTrainer keeps the data iterator in `_data_loader_iter`, a lazy property that its own
# run_step reads; a subclass that writes its own run_step (CPU autocast), or a resume that must
# create the iterator before restoring RNG states, has no public way to reach it.

def next_batch(trainer):
    """The next batch of a detectron2 SimpleTrainer's data loader, as its run_step takes it."""
    return next(trainer._data_loader_iter)


def start_data_iterator(trainer) -> None:
    """Create the trainer's data iterator now (detectron2 makes it on first use): the loader's
    iterator draws its base seed from torch's RNG when it is made."""
    trainer._data_loader_iter  # noqa: B018 (the lazy property creates the iterator)


# --- detectron2: ImageList padding under torch.export ----------------------------------------
# ImageList.from_tensors computes the padded batch size with tensor ops (stack, max, div: so that
# torch.jit.trace records them); under torch.export those tensors are symbolic, their values
# unknown, and the F.pad that reads them needs a data-dependent size torch.export cannot guard on
# (u0 - 128 != 0). No setting of detectron2 or torch.export computes it in Python ints. Exporting
# one fixed S x S image, the padded size is known when the graph is made, so while exporting,
# `from_tensors` is detectron2's rule (square_size, size_divisibility) computed in Python ints.

def _static_from_tensors(tensors, size_divisibility: int = 0, pad_value: float = 0.0, padding_constraints=None):
    import torch
    import torch.nn.functional as F
    from detectron2.structures import ImageList

    sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    if padding_constraints:
        if padding_constraints.get("square_size", 0) > 0:
            height = width = padding_constraints["square_size"]
        size_divisibility = padding_constraints.get("size_divisibility", size_divisibility)
    if size_divisibility > 1:
        height = -(-height // size_divisibility) * size_divisibility
        width = -(-width // size_divisibility) * size_divisibility
    batch = torch.stack([F.pad(t, [0, width - t.shape[-1], 0, height - t.shape[-2]], value=pad_value)
                         for t in tensors])
    return ImageList(batch.contiguous(), sizes)


@contextlib.contextmanager
def static_image_padding():
    """detectron2's ImageList.from_tensors with the padded size in Python ints, for torch.export."""
    from detectron2.structures import ImageList

    original = ImageList.__dict__["from_tensors"]
    ImageList.from_tensors = staticmethod(_static_from_tensors)
    try:
        yield
    finally:
        ImageList.from_tensors = original


# --- transformers -----------------------------------------------------------------------------
# Mask2Former's pixel-decoder attention (Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention)
# calls the module-level function `modeling_mask2former.multi_scale_deformable_attention(value,
# shapes, locations, weights)`; no public setting chooses its kernel. Rather than copy that
# forward, the function is replaced once by a dispatcher that runs transformers' own function
# unless a forward of a routed module is in progress. Which kernel applies is scoped to that
# forward by a context variable its hooks set and reset (a function called with tensors alone
# has no other way to know whose forward it serves), so other models in the process, and
# modules not routed, run exactly transformers' code.
_MSDA_ORIGINAL = "_peftseg_original_msda"
_msda_kernel: contextvars.ContextVar = contextvars.ContextVar("peftseg_m2f_msda_kernel", default=None)


def _mask2former_modeling():
    from transformers.models.mask2former import modeling_mask2former

    return modeling_mask2former


def _msda_dispatch(value, value_spatial_shapes, sampling_locations, attention_weights):
    original = getattr(_mask2former_modeling(), _MSDA_ORIGINAL)
    kernel = _msda_kernel.get()
    if kernel is None:
        return original(value, value_spatial_shapes, sampling_locations, attention_weights)
    return kernel(original, value, value_spatial_shapes, sampling_locations, attention_weights)


def route_mask2former_deformable_attention(model, kernel) -> int:
    """Run the pixel-decoder deformable attention of `model` through
    `kernel(original, value, shapes, locations, weights)`; returns how many modules are routed."""
    mod = _mask2former_modeling()
    if not hasattr(mod, _MSDA_ORIGINAL):
        setattr(mod, _MSDA_ORIGINAL, mod.multi_scale_deformable_attention)
        mod.multi_scale_deformable_attention = _msda_dispatch
    tokens: list = []  # a stack: one entry per forward in progress

    def enter(module, args):
        tokens.append(_msda_kernel.set(kernel))

    def leave(module, args, output):
        _msda_kernel.reset(tokens.pop())

    n = 0
    for m in model.modules():
        if isinstance(m, mod.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention):
            m.register_forward_pre_hook(enter)
            m.register_forward_hook(leave, always_call=True)  # reset even if forward raises
            n += 1
    return n


# --- peft -------------------------------------------------------------------------------------
# peft's LoRA picks its layer class by the wrapped module's type; a detectron2 Conv2d is an
# nn.Conv2d to it, so it gets lora.Conv2d, which adds the update after the Conv2d's own
# norm/activation. The one way peft offers to choose another layer class for a module type is
# LoraConfig._register_custom_module (documented as experimental in peft's "Custom models"
# guide, but underscore-named), which its LoRA model then dispatches on before its own types.

def register_custom_lora_layers(lora_config, mapping: dict) -> None:
    """Make peft wrap modules of each type in `mapping` with the LoRA layer class it maps to
    (isinstance match, checked before peft's own layer types)."""
    lora_config._register_custom_module(mapping)


# --- optuna -----------------------------------------------------------------------------------
# A trial that trains in several spawned processes is judged in rank 0, which is not the process
# that asked for it, so rank 0 must open the running trial again from the storage. Optuna's
# public API hands out Trial objects only through ask()/optimize() (a new trial); its own
# optimize loop and optuna-integration's TorchDistributedTrial build them with this constructor,
# whose docs advise against calling it directly.

def reopen_trial(study, trial_id: int):
    """The running trial of `study` whose storage id is `trial_id`, to report to and ask the
    pruner about, as the process that asked for it would."""
    import optuna

    return optuna.trial.Trial(study, trial_id)


def allow_recompiles(variants: int) -> None:
    """torch.compile compiles a frame once per set of constants it meets: every ViT block is its
    own (a drop-path rate of its own, window or global attention), times training and evaluation.
    Past `torch._dynamo.config.recompile_limit` (8 by default) dynamo warns once and runs every
    further variant eagerly, so a 12-block ViT-B would silently train a third of its blocks
    uncompiled. The limit has no public setter; it is raised to cover `variants`, never lowered."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, variants)
