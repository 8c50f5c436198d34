"""LoRA on detectron2's Conv2d, whose forward applies the layer's own `norm` and `activation`
after the convolution (FPN and SimpleFeaturePyramid convs, ROI-head convs, pixel-decoder convs,
ResNet convs with their FrozenBatchNorm).

peft's `lora.Conv2d` adds its update to what the wrapped layer returns, which for this class is
activation(norm(conv(x))): the update would land after the norm, where it is no longer a change
of the convolution's weight (it could not be merged, and it bypasses the normalisation). This
layer is peft's `lora.Conv2d` (same factors: A a conv with the base kernel, stride, padding and
dilation, B a 1×1 conv; same init, scaling, dropout, DoRA, multi-adapter bookkeeping and
merge/unmerge) with one change, the forward:

    activation(norm(conv(x) + Σ_adapters scale·B(A(dropout(x)))))

so the update is the convolution's, and merging folds it into the conv weight exactly (peft's
own `merge`, unchanged: the norm is outside the folded part). A plain torch nn.Conv2d (norm and
activation as separate modules) goes through peft's own layer; this one is registered for
detectron2's Conv2d only (peftseg.compat.register_custom_lora_layers).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from peft.tuners.lora import Conv2d as PeftLoraConv2d


class NormedConv2d(PeftLoraConv2d):
    """peft's LoRA Conv2d for a detectron2 Conv2d: the update joins before norm and activation."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            # peft's mixed-batch inference (one adapter per sample) runs the base layer whole and
            # adds each sample's update after it, i.e. after the norm: not offered for this layer
            raise ValueError("a per-sample adapter_names batch is not supported on a detectron2 Conv2d "
                             "with LoRA; switch adapters with set_adapter instead")
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x)
        if self.merged:  # the update is in base.weight already
            return base(x)
        # the convolution alone: nn.Conv2d's forward on detectron2's subclass skips its norm/activation
        result = nn.Conv2d.forward(base, x)
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            xa = self._cast_input_dtype(x, lora_A.weight.dtype)
            if name in self.lora_variant:  # DoRA: peft's variant reads `result` as the conv output
                result = self.lora_variant[name].forward(self, active_adapter=name, x=xa, result=result)
            else:
                result = result + lora_B(lora_A(self.lora_dropout[name](xa))) * self.scaling[name]
        result = result.to(result_dtype)
        if base.norm is not None:
            result = base.norm(result)
        if base.activation is not None:
            result = base.activation(result)
        return result


def custom_layers() -> dict[type[nn.Module], type[nn.Module]]:
    """Layer type -> peftseg's LoRA layer for it, for peft's custom-module mapping."""
    from detectron2.layers import Conv2d as D2Conv2d

    return {D2Conv2d: NormedConv2d}
