"""LoRA on convolutions: the conv target groups of each family, the update joining a detectron2
Conv2d before its own norm and activation, merging it into the conv weight, closed-form counts."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import Conv2d as D2Conv2d
from detectron2.layers.batch_norm import LayerNorm as D2LayerNorm  # the channel-wise LN of "LN" norms

from helpers import preset, ulps
from peftseg.errors import UserError
from peftseg.methods import apply_method
from peftseg.methods._conv_lora import NormedConv2d
from peftseg.methods.lora import LoraConfig
from peftseg.params import count_parameters
from peftseg.registry import FAMILIES

# the conv target groups each family offers (on top of its Linear/attention groups)
CONV_GROUPS = {
    "vitdet": {"neck_conv", "rpn_head_conv", "box_head_conv", "mask_head_conv"},
    "swin": {"neck_conv", "rpn_head_conv", "box_head_conv", "mask_head_conv"},
    "mask2former": {"pixel_decoder_conv"},
    "maskdino": {"pixel_decoder_conv", "backbone_conv"},
    "seem": {"pixel_decoder_conv"},
}


def lora(**overrides):
    return preset("method", "lora", LoraConfig, **overrides)


def test_each_family_lists_its_conv_groups():
    assert set(CONV_GROUPS) == set(FAMILIES.names())
    for family in FAMILIES:
        conv = {g for g in family.family_map.lora_targets if g.endswith("_conv")}
        assert conv == CONV_GROUPS[family.name], family.name


# --- the layer on a detectron2 Conv2d with its own norm and activation -------------------------

def _inject(model, cfg, adapter_name="default"):
    """peft's injection with peftseg's custom layers, as methods/_peft.inject registers them."""
    from peftseg.compat import register_custom_lora_layers
    from peftseg.methods._conv_lora import custom_layers

    register_custom_lora_layers(cfg, custom_layers())
    return peft.inject_adapter_in_model(cfg, model, adapter_name=adapter_name)


class _Holder(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


def _wrapped(norm: str, adapters=("default",), rank=3):
    """A detectron2 Conv2d (3x3, stride 2, bias, `norm`, ReLU) with LoRA adapters, injected by peft
    with the layers peftseg registers; the factors random, so the update is not zero."""
    torch.manual_seed(0)
    layer_norm = nn.GroupNorm(2, 8) if norm == "GN" else D2LayerNorm(8)
    conv = D2Conv2d(6, 8, 3, stride=2, padding=1, bias=True, norm=layer_norm, activation=nn.ReLU())
    model = _Holder(conv)
    for i, name in enumerate(adapters):
        cfg = peft.LoraConfig(r=rank + i, lora_alpha=4.0, target_modules=["conv"], bias="none")
        model = _inject(model, cfg, name)
    layer = model.conv
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape) * 0.3)
    return model, layer


def _by_hand(layer, x, adapter):
    """norm(conv(x) + scale·B(A(x))), then the activation, from the raw tensors."""
    base = layer.get_base_layer()
    out = F.conv2d(x, base.weight, base.bias, stride=2, padding=1)
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    out = out + layer.scaling[adapter] * F.conv2d(F.conv2d(x, a, stride=2, padding=1), b)
    return torch.relu(base.norm(out))


@pytest.mark.parametrize("norm", ["GN", "LN"])
def test_the_update_joins_the_convolution_before_its_norm_and_activation(norm):
    model, layer = _wrapped(norm)
    assert type(layer) is NormedConv2d
    x = torch.randn(2, 6, 10, 10)
    with torch.no_grad():
        got, want = model(x), _by_hand(layer, x, "default")
        base_out = layer.get_base_layer()(x)
    assert not torch.allclose(got, base_out, atol=1e-3)  # the update does change the output
    # the same three convolutions and one norm, in the same order: exact
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # peft's plain lora.Conv2d would have added it after the norm: that is a different function
    after = base_out + layer.scaling["default"] * F.conv2d(
        F.conv2d(x, layer.lora_A["default"].weight, stride=2, padding=1), layer.lora_B["default"].weight)
    assert not torch.allclose(got, after, atol=1e-3)


@pytest.mark.parametrize("norm", ["GN", "LN"])
def test_merge_folds_the_update_into_the_conv_weight_and_unmerge_restores_it(norm):
    model, layer = _wrapped(norm)
    x = torch.randn(2, 6, 10, 10)
    weight = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        unmerged = model(x)
        layer.merge(safe_merge=True)
        merged = model(x)
        assert not torch.equal(layer.get_base_layer().weight, weight)
        layer.unmerge()
        again = model(x)
    # the merged conv sums in another order: a few roundings of the pre-norm value, which the
    # norm (divides by a std of order 1) and ReLU carry over; 64 ulps of the output's max
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=ulps(unmerged, 64))
    torch.testing.assert_close(layer.get_base_layer().weight, weight, rtol=0, atol=ulps(weight, 4))
    torch.testing.assert_close(again, unmerged, rtol=0, atol=ulps(unmerged, 64))


def test_two_adapters_in_one_conv_switch_and_disabling_gives_the_base_layer():
    model, layer = _wrapped("GN", adapters=("cats", "dogs"))
    x = torch.randn(2, 6, 10, 10)
    with torch.no_grad():
        outs = {}
        for name in ("cats", "dogs"):
            layer.set_adapter(name)
            outs[name] = model(x)
            torch.testing.assert_close(outs[name], _by_hand(layer, x, name), rtol=0, atol=0)
        assert not torch.allclose(outs["cats"], outs["dogs"], atol=1e-3)
        layer.enable_adapters(False)
        torch.testing.assert_close(model(x), layer.get_base_layer()(x), rtol=0, atol=0)
    assert layer.lora_A["cats"].out_channels == 3 and layer.lora_A["dogs"].out_channels == 4


def test_dora_on_a_normed_conv_starts_at_the_base_output():
    # DoRA's magnitude is per output channel of the conv weight: it too acts before the norm
    torch.manual_seed(0)
    conv = D2Conv2d(6, 8, 3, padding=1, norm=nn.GroupNorm(2, 8), activation=nn.ReLU())
    model = _Holder(copy.deepcopy(conv))
    model = _inject(model, peft.LoraConfig(r=2, target_modules=["conv"], use_dora=True))
    x = torch.randn(2, 6, 10, 10)
    with torch.no_grad():
        want = conv(x)
        torch.testing.assert_close(model(x), want, rtol=0, atol=ulps(want, 64))


# --- on the tiny presets --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vitdet():
    from peftseg.models import build_model

    torch.manual_seed(0)
    return build_model(preset("model", "vitdet_tiny", FAMILIES.get("vitdet").config), num_classes=3).eval()


def _conv_lora_params(base, family, groups, rank):
    """r·(in·k² + out) per conv the groups select: A is a conv r×in×k×k, B a 1×1 conv out×r."""
    import re

    total = 0
    for name, m in base.named_modules():
        if any(re.fullmatch(family.lora_targets[g], name) for g in groups):
            assert type(m) in (nn.Conv2d, D2Conv2d), name
            k = m.kernel_size[0] * m.kernel_size[1]
            total += rank * (m.in_channels * k + m.out_channels)
    return total


def test_conv_lora_counts_in_closed_form(vitdet):
    groups = ["neck_conv", "rpn_head_conv", "box_head_conv", "mask_head_conv"]
    family = vitdet.peftseg_facts.family
    expected = _conv_lora_params(vitdet, family, groups, 4)
    model = apply_method(copy.deepcopy(vitdet), lora(targets=groups, rank=4, train_task_layers=False))
    counts = count_parameters(model).by_group["peft"]
    # vitdet_tiny: neck 1x1 48->64, 96->64 twice and three 3x3 64->64; RPN, box, mask convs 3x3
    assert counts["total"] == counts["trainable"] == expected == 18240
    wrapped = {n for n, m in model.named_modules() if isinstance(m, NormedConv2d)}
    assert wrapped == {"backbone.simfp_3.1", "backbone.simfp_3.2", "backbone.simfp_4.0", "backbone.simfp_4.1",
                       "backbone.simfp_5.1", "backbone.simfp_5.2", "proposal_generator.rpn_head.conv",
                       "roi_heads.box_head.conv1", "roi_heads.mask_head.mask_fcn1", "roi_heads.mask_head.mask_fcn2"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_" in n}


def test_a_resnet_backbone_s_convs_count_in_closed_form():
    from peftseg.models import build_model

    base = build_model(preset("model", "maskdino_tiny", FAMILIES.get("maskdino").config, backbone="resnet",
                              resnet_depth=18), num_classes=3)
    family = base.peftseg_facts.family
    expected = _conv_lora_params(base, family, ["backbone_conv"], 2)
    model = apply_method(base, lora(targets=["backbone_conv"], rank=2, train_task_layers=False))
    # ResNet-18: stem 7x7 3->64, 16 3x3 block convs, 3 projection shortcuts
    assert sum(isinstance(m, NormedConv2d) for m in model.modules()) == 20
    assert count_parameters(model).by_group["peft"]["total"] == expected == 2 * (
        3 * 49 + 64 + 4 * (64 * 9 + 64) + (64 * 9 + 128) + 3 * (128 * 9 + 128) + (64 + 128)
        + (128 * 9 + 256) + 3 * (256 * 9 + 256) + (128 + 256) + (256 * 9 + 512) + 3 * (512 * 9 + 512) + (256 + 512))


def test_merged_conv_lora_computes_what_the_unmerged_model_does(vitdet):
    from peftseg.checkpoint.merge import merge_and_unload

    model = apply_method(copy.deepcopy(vitdet), lora(targets=["neck_conv"], train_task_layers=False)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    x = torch.rand(1, 3, 128, 128, generator=g) * 255
    with torch.no_grad():
        base, before = vitdet.backbone(x), model.backbone(x)
        merged = merge_and_unload(model)
        after = merged.backbone(x)
    assert not any(isinstance(m, NormedConv2d) for m in merged.modules())
    for k in before:
        assert not torch.allclose(before[k], base[k], atol=1e-3), k  # the update is not zero
        # folding rounds each conv weight once and makes three convolutions one, before an LN:
        # a few ulps of the feature (measured <= 8); 64 ulps of its max
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=ulps(before[k], 64))


def test_only_lora_wraps_convolutions(vitdet):
    from peftseg.methods.loha import LohaConfig

    with pytest.raises(UserError, match=r"backbone\.simfp_3\.1, a convolution; only method=lora wraps"):
        apply_method(copy.deepcopy(vitdet), preset("method", "loha", LohaConfig, targets=["neck_conv"]))


def test_a_transposed_or_grouped_convolution_is_refused_by_name():
    from peftseg.methods._peft import _check_wrappable

    with pytest.raises(UserError, match="up, a transposed convolution"):
        _check_wrappable("up", nn.ConvTranspose2d(4, 4, 2), "neck_conv", "method.targets", "default", convs=True)
    with pytest.raises(UserError, match=r"dw, a grouped convolution \(groups=4\)"):
        _check_wrappable("dw", nn.Conv2d(4, 4, 3, groups=4), "neck_conv", "method.targets", "default", convs=True)


def test_fpn_convs_called_through_plain_lists_run_the_wrapper_and_then_the_merged_conv():
    """detectron2's FPN calls its convs through plain lists beside the registered children: those
    lists follow the LoRA wrapper in, and the merged conv out again."""
    from peftseg.checkpoint.merge import merge_and_unload
    from peftseg.models import build_model

    torch.manual_seed(0)
    base = build_model(preset("model", "swin_tiny", FAMILIES.get("swin").config), num_classes=3).eval()
    model = apply_method(copy.deepcopy(base), lora(targets=["neck_conv"], train_task_layers=False)).eval()
    fpn = model.backbone
    assert all(type(c) is NormedConv2d for c in (*fpn.lateral_convs, *fpn.output_convs))
    assert fpn.lateral_convs[0] is fpn.fpn_lateral5 and fpn.output_convs[-1] is fpn.fpn_output2
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2)) * 255
    with torch.no_grad():
        plain, before = base.backbone(x), fpn(x)
        assert all(not torch.allclose(before[k], plain[k], atol=1e-3) for k in before)  # every level adapted
        merge_and_unload(model)
        after = fpn(x)
    assert all(type(c) is D2Conv2d for c in (*fpn.lateral_convs, *fpn.output_convs))
    assert fpn.lateral_convs[0] is fpn.fpn_lateral5
    for k in before:
        # folding rounds each conv weight once and makes three convolutions one, before an LN
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=ulps(before[k], 64))


def test_a_group_whose_convs_sit_in_a_sequential_wraps_the_convs_not_the_sequential():
    # detectron2's RPN head names one conv `conv`, two or more `conv.conv0`, `conv.conv1`, …
    from peftseg.models import build_model

    base = build_model(preset("model", "vitdet_tiny", FAMILIES.get("vitdet").config, rpn_head_convs=2), num_classes=3)
    model = apply_method(base, lora(targets=["rpn_head_conv"], rank=2, train_task_layers=False))
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, NormedConv2d))
    assert wrapped == ["proposal_generator.rpn_head.conv.conv0", "proposal_generator.rpn_head.conv.conv1"]
    assert count_parameters(model).by_group["peft"]["total"] == 2 * 2 * (64 * 9 + 64)
