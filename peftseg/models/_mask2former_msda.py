"""model.deform_attn_impl for the mask2former family: transformers' pixel-decoder deformable
attention routed through models/_msda.py.

transformers' `Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention.forward` calls the
module-level function `multi_scale_deformable_attention(value, shapes, locations, weights)`
(grid_sample; the same signature as our kernels). Rather than copy that forward, the module
function is replaced once by a dispatcher that runs transformers' own function unless a
forward of one of *this model's* attention modules is in progress, marked by a context
variable that forward hooks set and reset; so other models in the process, and this one with
`pytorch`, run exactly transformers' code.
"""

from __future__ import annotations

import contextvars

import torch.nn as nn

from peftseg.models._msda import ms_deform_attn

_impl: contextvars.ContextVar[str | None] = contextvars.ContextVar("peftseg_m2f_msda_impl", default=None)
_ORIGINAL = "_peftseg_original_msda"


def _modeling():
    from transformers.models.mask2former import modeling_mask2former

    return modeling_mask2former


def _dispatch(value, value_spatial_shapes, sampling_locations, attention_weights):
    original = getattr(_modeling(), _ORIGINAL)
    impl = _impl.get()
    if impl is None:
        return original(value, value_spatial_shapes, sampling_locations, attention_weights)
    shapes = [(int(h), int(w)) for h, w in value_spatial_shapes]
    return ms_deform_attn(impl, original, value, shapes, sampling_locations, attention_weights)


def _install() -> None:
    mod = _modeling()
    if not hasattr(mod, _ORIGINAL):
        setattr(mod, _ORIGINAL, mod.multi_scale_deformable_attention)
        mod.multi_scale_deformable_attention = _dispatch


def set_deform_attn_impl(model: nn.Module, impl: str) -> int:
    """Route the deformable attention of `model`'s pixel decoder through `impl`; returns the
    number of attention modules routed (0 for `pytorch`: transformers' path as it is)."""
    if impl == "pytorch":
        return 0
    _install()
    attn_type = _modeling().Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention
    tokens: list = []  # a stack: one entry per forward in progress

    def enter(module, args):
        tokens.append(_impl.set(impl))

    def leave(module, args, output):
        _impl.reset(tokens.pop())

    n = 0
    for m in model.modules():
        if isinstance(m, attn_type):
            m.register_forward_pre_hook(enter)
            m.register_forward_hook(leave, always_call=True)  # reset even if forward raises
            n += 1
    return n
