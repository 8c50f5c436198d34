"""model.deform_attn_impl for the mask2former family: transformers' pixel-decoder deformable
attention routed through models/_msda.py (how: peftseg.compat, since transformers offers no
public setting for it); with `pytorch` the model runs transformers' code as it is."""

from __future__ import annotations

import torch.nn as nn

from peftseg.compat import route_mask2former_deformable_attention
from peftseg.models._msda import ms_deform_attn


def set_deform_attn_impl(model: nn.Module, impl: str) -> int:
    """Route the deformable attention of `model`'s pixel decoder through `impl`; returns the
    number of attention modules routed (0 for `pytorch`: transformers' path as it is)."""
    if impl == "pytorch":
        return 0

    def kernel(original, value, value_spatial_shapes, sampling_locations, attention_weights):
        shapes = [(int(h), int(w)) for h, w in value_spatial_shapes]
        return ms_deform_attn(impl, original, value, shapes, sampling_locations, attention_weights)

    return route_mask2former_deformable_attention(model, kernel)
