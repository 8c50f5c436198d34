"""Methods `full`, `heads`, `lora`: what trains, what gets wrapped, what is refused."""

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf
from peft.tuners.lora import LoraLayer

from peftseg.errors import UserError
from peftseg.methods import apply_method
from peftseg.methods.full import FullConfig
from peftseg.methods.heads import HeadsConfig
from peftseg.methods.lora import LoraConfig
from helpers import preset



def lora_cfg(**overrides):
    return preset("method", "lora", LoraConfig, **overrides)


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def images(n=2, size=128):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8),
             "height": size, "width": size} for _ in range(n)]


def test_heads_freezes_exactly_the_backbone(model):
    apply_method(model, preset("method", "heads", HeadsConfig))
    names = {n for n, _ in model.named_parameters()}
    backbone = {n for n in names if n.startswith("backbone.net.")}
    assert backbone and trainable(model) == names - backbone


def test_full_trains_everything(model):
    apply_method(model, preset("method", "heads", HeadsConfig))
    apply_method(model, preset("method", "full", FullConfig))
    assert all(p.requires_grad for p in model.parameters())


def test_lora_wraps_exactly_the_targeted_linears(model):
    depth = len(model.backbone.net.blocks)
    model = apply_method(model, lora_cfg())
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))
    expected = sorted(
        f"backbone.net.blocks.{i}.attn.{leaf}" for i in range(depth) for leaf in ("qkv", "proj")
    )
    assert wrapped == expected
    lora_params = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert lora_params and all(n.startswith(tuple(expected)) for n in lora_params)
    heads_and_neck = {
        n for n, _ in model.named_parameters()
        if n.startswith(("proposal_generator.", "roi_heads.")) or
        (n.startswith("backbone.") and not n.startswith("backbone.net."))
    }
    assert trainable(model) == lora_params | heads_and_neck


def test_lora_mlp_targets_and_frozen_heads(model):
    model = apply_method(model, lora_cfg(targets=["mlp"], train_task_layers=False, rank=2))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == {f"backbone.net.blocks.{i}.mlp.fc{j}" for i in range(4) for j in (1, 2)}
    assert trainable(model) == {n for n, _ in model.named_parameters() if "lora_" in n}


def test_lora_at_init_leaves_outputs_unchanged(base, model):
    base.eval()
    model = apply_method(model, lora_cfg(dropout=0.1)).eval()
    assert all(torch.count_nonzero(m.lora_B["default"].weight) == 0
               for m in model.modules() if isinstance(m, LoraLayer))
    batch = images()
    with torch.no_grad():
        x = base.preprocess_image(batch).tensor
        feats_base, feats_lora = base.backbone(x), model.backbone(x)
        out_base, out_lora = base(batch), model(batch)
    assert feats_base.keys() == feats_lora.keys()
    assert all(torch.equal(feats_base[k], feats_lora[k]) for k in feats_base)
    for a, b in zip(out_base, out_lora):
        a, b = a["instances"], b["instances"]
        assert len(a) > 0
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores)
        assert torch.equal(a.pred_masks, b.pred_masks)

    # and the LoRA path is live: a non-zero B changes the features
    with torch.no_grad():
        model.backbone.net.blocks[0].attn.qkv.lora_B["default"].weight.fill_(0.1)
        moved = model.backbone(x)
    assert not torch.equal(moved["p3"], feats_base["p3"])


@pytest.mark.parametrize("rank", [0, -4])
def test_lora_rank_must_be_positive(model, rank):
    with pytest.raises(UserError, match=r"method\.rank must be an integer at least 1"):
        apply_method(model, lora_cfg(rank=rank))


@pytest.mark.parametrize("key,value", [("alpha", 0.0), ("dropout", 1.0), ("dropout", -0.1)])
def test_lora_alpha_and_dropout_ranges(model, key, value):
    with pytest.raises(UserError, match=rf"method\.{key} must"):
        apply_method(model, lora_cfg(**{key: value}))


def test_unknown_target_group_lists_the_family_groups(model):
    with pytest.raises(UserError) as e:
        apply_method(model, lora_cfg(targets=["attn_qkv", "ffn"]))
    msg = str(e.value)
    assert "'ffn'" in msg and all(g in msg for g in ("attn_qkv", "attn_proj", "mlp"))
    assert not any("lora_" in n for n, _ in model.named_parameters())  # refused before injecting


def test_target_group_matching_nothing_is_refused(model):
    family = dataclasses.replace(
        model.peftseg_facts.family,
        lora_targets={**model.peftseg_facts.family.lora_targets, "decoder": r"sem_seg_head\..*"},
    )
    model.peftseg_facts.family = family
    with pytest.raises(UserError, match="matches no module") as e:
        apply_method(model, lora_cfg(targets=["decoder"]))
    assert "attn_qkv" in str(e.value)


def test_unknown_method_is_a_user_error(model):
    with pytest.raises(UserError, match="lora"):
        apply_method(model, OmegaConf.create({"name": "prefix_tuning"}))
