"""Method `mona`: closed-form size, exact identity at init, placement on the block's stream,
the token grid taken from each block, activation checkpointing, removal, refusals."""

import copy

import pytest
import torch
import torch.nn as nn

from helpers import preset, shapes_batch, ulps
from peftseg.build.activation_checkpointing import enable_activation_checkpointing
from peftseg.errors import UserError
from peftseg.methods import apply_method
from peftseg.methods._mona_layers import MonaSites, remove_mona
from peftseg.methods.mona import MonaConfig, mona_size
from peftseg.models import build_model
from peftseg.models.family import FamilyMap, ModelFacts
from peftseg.params import count_parameters
from peftseg.registry import FAMILIES


def mona_cfg(**overrides):
    return preset("method", "mona", MonaConfig, **overrides)


def build(name: str):
    torch.manual_seed(0)
    family = name.split("_")[0].replace("m2f", "mask2former")
    return build_model(preset("model", name, FAMILIES.get(family).config), num_classes=3).eval()


def sites_of(model) -> dict[str, MonaSites]:
    return {n: m.peft_mona for n, m in model.named_modules() if isinstance(getattr(m, "peft_mona", None), MonaSites)}


def make_live(model, seed: int = 1):
    """Give every up projection non-zero weights, so each Mona changes its stream."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sites in sites_of(model).values():
            for mona in (sites.attn, sites.mlp):
                if mona is not None:
                    mona.up.weight.copy_(torch.randn(mona.up.weight.shape, generator=g) * 0.05)
                    mona.up.bias.copy_(torch.randn(mona.up.bias.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (3, 128, 128), generator=g, dtype=torch.uint8),
             "height": 128, "width": 128} for _ in range(2)]


def test_the_closed_form_per_mona():
    # LayerNorm 2d + scales 2d + down (dm + m) + depthwise 3/5/7 (83m + 3m) + 1x1 (m² + m) + up (md + d)
    assert mona_size(768, 64) == 2 * 768 * 64 + 64 * 64 + 5 * 768 + 88 * 64 == 111_872
    from peftseg.methods._mona_layers import Mona

    for d, m in ((96, 48), (16, 8), (768, 64)):
        assert sum(p.numel() for p in Mona(d, m, 0.1).parameters()) == mona_size(d, m)


@pytest.mark.parametrize("overrides,sites", [({}, 2), ({"sites": ["mlp"]}, 1), ({"bottleneck": 8}, 2)])
def test_vitdet_trainable_count_equals_the_closed_form(base, overrides, sites):
    # vitdet_tiny: 4 blocks of width 96; auto bottleneck min(64, 96 // 2) = 48
    before = count_parameters(base)
    model = apply_method(copy.deepcopy(base), mona_cfg(**overrides))
    m = overrides.get("bottleneck", 48)
    expected = 4 * sites * mona_size(96, m)
    c = count_parameters(model)
    assert c.by_group["peft"] == {"total": expected, "trainable": expected}
    assert c.total == before.total + expected
    assert c.by_group["backbone"]["trainable"] == 0
    assert c.trainable == expected + before.by_group["neck"]["total"] + before.by_group["task_heads"]["total"]


def test_swin_trainable_count_equals_the_closed_form():
    # swin_tiny: 2 blocks per stage, widths 16, 32, 64, 128; bottleneck min(64, d // 2)
    model = apply_method(build("swin_tiny"), mona_cfg(train_task_layers=False))
    expected = sum(2 * 2 * mona_size(d, min(64, d // 2)) for d in (16, 32, 64, 128))
    c = count_parameters(model)
    assert c.by_group["peft"]["total"] == c.trainable == expected == 155_840
    # last:2 places them only in the last stage's two blocks
    last = apply_method(build("swin_tiny"), mona_cfg(blocks="last:2", train_task_layers=False))
    assert count_parameters(last).trainable == 2 * 2 * mona_size(128, 64)
    assert set(sites_of(last)) == {f"backbone.bottom_up.layers.3.blocks.{i}" for i in range(2)}


def test_outputs_equal_the_base_at_init_and_the_path_is_live(base, model, images):
    x = base.preprocess_image(images).tensor
    with torch.no_grad():
        feats, dets = base.backbone(x), base(images)
        model = apply_method(model, mona_cfg()).eval()
        assert len(sites_of(model)) == 4
        for k, v in model.backbone(x).items():
            assert torch.equal(v, feats[k]), k
        for a, b in zip(dets, model(images)):
            assert len(a["instances"]) > 0
            assert torch.equal(a["instances"].scores, b["instances"].scores)
            assert torch.equal(a["instances"].pred_masks, b["instances"].pred_masks)
        make_live(model)
        moved = model.backbone(x)
        # by more than a backbone's worth of rounding (64 ulps of the feature), so not by noise
        assert all(not torch.allclose(moved[k], feats[k], rtol=0, atol=ulps(feats[k], 64)) for k in feats)


def test_vit_block_places_mona_on_the_stream_after_attention_and_after_the_mlp(model):
    model = apply_method(model, mona_cfg()).eval()
    make_live(model)
    block = model.backbone.net.blocks[1]  # global attention: no window partition in the way
    assert block.window_size == 0
    sites = block.peft_mona
    x = torch.randn(2, 8, 8, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # the paper's order, by hand (.forward skips the hooks)
        s = x + block.attn.forward(block.norm1.forward(x))
        s = s + sites.attn.delta(s, (8, 8))
        out = s + block.mlp.forward(block.norm2.forward(s))
        out = out + sites.mlp.delta(out, (8, 8))
        # the same four residual additions, maybe associated otherwise: one ulp of |out| each; 8
        tol = ulps(out, 8)
        torch.testing.assert_close(block(x), out, rtol=0, atol=tol)
        assert not torch.allclose(out, type(block).forward(block, x), rtol=0, atol=tol)  # Monas matter


@pytest.mark.parametrize("name", ["swin_tiny", "m2f_tiny", "maskdino_tiny"])
def test_swin_blocks_give_their_own_grid_non_square_images(name):
    """Swin tokens are (B, H·W, C): the grid each block ran on comes from the block (detectron2:
    blk.H/W; transformers: input_dimensions), so a 96x128 image gives 3:4 grids, never 4:3."""
    model = apply_method(build(name), mona_cfg()).eval()
    make_live(model)
    seen = {}

    def record(block, args, kwargs):
        seen[id(block)] = block.peft_mona._grid

    for block in [m for m in model.modules() if isinstance(getattr(m, "peft_mona", None), MonaSites)]:
        block.register_forward_pre_hook(record, with_kwargs=True)  # after Mona's own pre-hook
    with torch.no_grad():
        if name == "swin_tiny":  # the R-CNN pads batches to a square: run its Swin directly
            model.backbone.bottom_up(torch.randn(1, 3, 96, 128))
        else:
            image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)
            model([{"image": image, "height": 96, "width": 128}])
    assert len(seen) == len(sites_of(model)) > 0
    for h, w in seen.values():
        assert h * 4 == w * 3 or (h, w) in {(1, 1), (2, 2)}, (h, w)  # padded to a multiple of 32
    assert max(seen.values()) == (24, 32)  # stage 0: stride 4


@pytest.mark.parametrize("name", ["swin_tiny", "m2f_tiny"])
def test_activation_checkpointing_gives_the_same_gradients(name, tmp_path):
    batch = shapes_batch(tmp_path, n=2)
    grads = []
    for checkpointed in (False, True):
        model = apply_method(build(name), mona_cfg())
        make_live(model)
        if checkpointed:
            assert enable_activation_checkpointing(model)
        model.train()
        torch.manual_seed(0)  # RPN sampling and Mona's dropout draw the same
        from detectron2.utils.events import EventStorage

        with EventStorage():
            sum(model(batch).values()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "peft_mona" in n})
        # nothing of the call is left on the model: it deep-copies and runs again
        assert all(s._attn_delta is None and not s._open for s in sites_of(model).values())
        copy.deepcopy(model)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        # same kernels recomputed; a gradient sums batch x tokens products (as in test_memory): 64 ulps
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=ulps(grads[0][n], 64), msg=n)
    assert all(g.abs().sum() > 0 for g in grads[0].values()), "a Mona parameter got no gradient"


def test_deepcopy_and_remove_restore_the_base(base, model, images):
    keys = set(base.state_dict())
    model = apply_method(model, mona_cfg()).eval()
    make_live(model)
    assert all("peft_mona." in k for k in set(model.state_dict()) - keys)
    assert "backbone.net.blocks.0.peft_mona.attn.filter.convs.2.weight" in model.state_dict()
    with torch.no_grad():
        live = model(images)
        again = copy.deepcopy(model)(images)
        for a, b in zip(live, again):
            assert torch.equal(a["instances"].scores, b["instances"].scores)
        remove_mona(model)
        assert set(model.state_dict()) == keys
        for a, b in zip(base(images), model(images)):
            assert torch.equal(a["instances"].scores, b["instances"].scores)


def test_refusals(base):
    from omegaconf import OmegaConf

    from peftseg.methods._mona_layers import add_mona

    class Toy(nn.Module):  # a family whose backbone has no 2-D token grid (like a ResNet)
        peftseg_facts = ModelFacts(FamilyMap(name="toy", groups={"backbone": ("body.",)}, adapter_sites={},
                                             lora_targets={}, backbone_blocks=r"body\.\d+"))

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3))

    with pytest.raises(UserError, match="2-D token grid.*method=adapter"):
        apply_method(Toy(), mona_cfg())
    with pytest.raises(UserError, match="bottleneck=96 is not below the width d=96"):
        apply_method(copy.deepcopy(base), mona_cfg(bottleneck=96))
    for bad, match in (({"sites": ["ffn"]}, "not a list of Mona sites"), ({"sites": []}, "not a list"),
                       ({"dropout": 1.0}, "probability"), ({"bottleneck": -1}, "not a width")):
        with pytest.raises(UserError, match=match):
            OmegaConf.to_object(mona_cfg(**bad))
    twice = apply_method(copy.deepcopy(base), mona_cfg())
    with pytest.raises(UserError, match="already carries Monas"):
        add_mona(twice, OmegaConf.to_object(mona_cfg()))
