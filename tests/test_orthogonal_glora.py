"""OFT, BOFT and GLoRA through peft: their parameter counts in closed form, the settings they
refuse by name, and merge = the unmerged model for each mergeable peft method added with them."""

import copy

import pytest
import torch

from helpers import preset, ulps
from peftseg.errors import UserError
from peftseg.methods import apply_method
from peftseg.params import count_parameters
from peftseg.registry import METHODS


def method(name, **overrides):
    return preset("method", name, METHODS.get(name).config, **overrides)


def qkv_and_proj(model):
    """The Linears of the default targets (attn_qkv, attn_proj) on vitdet_tiny: 4 blocks."""
    blocks = model.backbone.net.blocks
    return [b.attn.qkv for b in blocks] + [b.attn.proj for b in blocks]


def peft_params(model) -> int:
    return count_parameters(model).by_group["peft"]["trainable"]


def test_oft_trains_in_times_half_block_minus_one_per_linear(base, model):
    layers = [(m.in_features, m.out_features) for m in qkv_and_proj(base)]
    b = 16
    # in/b blocks, each a skew-symmetric b × b matrix: b(b-1)/2 free entries
    assert peft_params(apply_method(model, method("oft", block_size=b))) == sum(i // b * b * (b - 1) // 2 for i, _ in layers)
    shared = apply_method(copy.deepcopy(base), method("oft", block_size=0, num_blocks=4, block_share=True))
    assert peft_params(shared) == sum((i // 4) * (i // 4 - 1) // 2 for i, _ in layers)  # one block per layer


def test_boft_trains_blocks_and_an_output_scale_per_linear(base, model):
    layers = [(m.in_features, m.out_features) for m in qkv_and_proj(base)]
    b = 4
    # one butterfly factor of in/b blocks of b × b, plus a scale per output feature
    assert peft_params(apply_method(model, method("boft", block_size=b))) == sum(i * b + o for i, o in layers)


def test_glora_counts_follow_its_forms(base, model):
    layers = [(m.in_features, m.out_features) for m in qkv_and_proj(base)]
    assert all(m.bias is not None for m in qkv_and_proj(base))
    r = 4
    # A, B: rank-r pairs; C: (in × r)(r × 1); D, E: one scalar each (the layers have biases)
    full = sum(2 * r * (i + o) + r * (i + 1) + 2 for i, o in layers)
    assert peft_params(apply_method(model, method("glora", rank=r))) == full
    vectors = apply_method(copy.deepcopy(base), method("glora", rank=r, ab="vector", c="vector", de="vector"))
    assert peft_params(vectors) == sum(2 * o + i + 2 * o for i, o in layers)


def test_glora_bias_scale_trains_on_a_nonzero_bias(model):
    """D scales the base bias (b0 ⊙ D): on the random tiny backbone's zero biases it has no
    gradient (test_contract leaves it out there); on a nonzero bias it trains like the rest."""
    model = apply_method(model, method("glora")).train()
    layer = model.backbone.net.blocks[0].attn.qkv
    with torch.no_grad():
        layer.get_base_layer().bias.fill_(0.5)
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    sum(f.square().mean() for f in model.backbone(x).values()).backward()
    assert layer.glora_D["default"].X.grad.abs().item() > 0
    assert model.backbone.net.blocks[1].attn.qkv.glora_D["default"].X.grad.item() == 0  # b0 = 0 there


@pytest.mark.parametrize("name,overrides,needle", [
    ("oft", {"block_size": 7}, r"oft: method\.block_size=7 does not split the 96 input features of "
                               r"backbone\.net\.blocks\.0\.attn\.qkv"),
    ("oft", {"block_size": 8, "num_blocks": 4}, "give exactly one of them"),
    ("boft", {"block_size": 0, "num_blocks": 0}, "give exactly one of them"),
    ("oft", {"block_size": 0, "num_blocks": 5}, r"oft: method\.num_blocks=5 does not split the 96 input features"),
    ("boft", {"block_size": 5}, r"boft: method\.block_size=5 does not split the 96 input features"),
    ("boft", {"butterfly_factor": 2}, r"method\.butterfly_factor=2 needs peft's BOFT CUDA extension"),
    ("glora", {"ab": "full"}, r"method\.ab"),
])
def test_block_settings_peft_would_change_are_refused_by_name(model, name, overrides, needle):
    if name == "boft" and overrides.get("butterfly_factor", 1) > 1 and torch.cuda.is_available():
        pytest.skip("the CUDA extension may build here")
    with pytest.raises(UserError, match=needle):
        apply_method(model, method(name, **overrides))


MERGEABLE_NEW = {"adalora": ("lora_",), "oft": ("oft_",), "boft": ("boft_",), "glora": ("glora_",)}


@pytest.mark.parametrize("name", sorted(MERGEABLE_NEW))
def test_merged_model_equals_the_unmerged_one(base, name):
    from peftseg.checkpoint.merge import merge_and_unload

    assert METHODS.get(name).mergeable
    model = apply_method(copy.deepcopy(base), method(name)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # make every update non-trivial before folding it in
        for n, p in model.named_parameters():
            if any(k in n for k in MERGEABLE_NEW[name]):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, bare = model.backbone(x), base.backbone(x)
        after = merge_and_unload(model).backbone(x)
    assert not any(k in n for n, _ in model.named_parameters() for k in MERGEABLE_NEW[name])
    from peftseg.methods._peft import tuner_of

    assert tuner_of(model) is None  # AdaLoRA's allocator goes with its layers
    for k in before:
        assert not torch.allclose(before[k], bare[k], rtol=0, atol=ulps(before[k], 32)), "the update is trivial"
        # folding rounds each weight once and makes two matmuls one (a rotation: a product of the
        # rotation and the weight): a few ulps per adapted layer; 32 ulps of the feature's max over
        # the 4 blocks, as for the LoRA family
        err = (after[k] - before[k]).abs().max().item()
        assert err <= ulps(before[k], 32), (name, k, err)
