"""The peft-backed methods beyond plain LoRA: rsLoRA, DoRA, LoHa, LoKr, IA3, and BitFit."""

import copy

import pytest
import torch
import torch.nn as nn

from peftseg.errors import UserError
from peftseg.methods import apply_method
from peftseg.methods.bitfit import BitfitConfig
from peftseg.methods.ia3 import Ia3Config
from peftseg.methods.loha import LohaConfig
from peftseg.methods.lokr import LokrConfig
from peftseg.methods.lora import LoraConfig
from peftseg.params import count_parameters
from helpers import preset, ulps

SCHEMAS = {"lora": LoraConfig, "loha": LohaConfig, "lokr": LokrConfig, "ia3": Ia3Config, "bitfit": BitfitConfig}


def method(name, **overrides):
    return preset("method", name, SCHEMAS[name], **overrides)


def images(n=2, size=128):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8),
             "height": size, "width": size} for _ in range(n)]


def features(model, batch):
    with torch.no_grad():
        return model.backbone(model.preprocess_image(batch).tensor)


def linear(model, name) -> nn.Linear:
    return dict(model.named_modules())[name]


@pytest.mark.parametrize("name,overrides", [
    ("lora", {"use_rslora": True}),
    ("loha", {}),
    ("lokr", {}),
    ("ia3", {}),
    ("lora", {"targets": ["mlp", "task_heads"]}),
])
def test_outputs_at_init_equal_the_base_model_exactly(base, model, name, overrides):
    model = apply_method(model, method(name, **overrides)).eval()
    assert count_parameters(model).by_group["peft"]["total"] > 0
    batch = images()
    fb, fm = features(base, batch), features(model, batch)
    assert all(torch.equal(fb[k], fm[k]) for k in fb)
    with torch.no_grad():
        ob, om = base(batch), model(batch)
    for a, b in zip(ob, om):
        assert torch.equal(a["instances"].scores, b["instances"].scores)
        assert torch.equal(a["instances"].pred_masks, b["instances"].pred_masks)


def test_dora_at_init_matches_the_base_model_to_rounding(base, model):
    # DoRA rescales by m/||W + BA|| with m = ||W||: the identity up to float rounding
    model = apply_method(model, method("lora", use_dora=True)).eval()
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
    batch = images()
    fb, fm = features(base, batch), features(model, batch)
    for k in fb:
        # m/||W|| is 1 up to two norms' rounding (reductions of ~100-400 terms) and a product, per
        # adapted layer; over the 4 blocks 32 ulps of the feature's max
        torch.testing.assert_close(fm[k], fb[k], rtol=0, atol=ulps(fb[k], 32))


def qkv_and_proj(model):
    blocks = model.backbone.net.blocks
    return [b.attn.qkv for b in blocks] + [b.attn.proj for b in blocks]


def test_loha_adds_two_rank_r_pairs_per_linear(model):
    layers = [(m.in_features, m.out_features) for m in qkv_and_proj(model)]
    r = 4
    model = apply_method(model, method("loha", rank=r))
    assert count_parameters(model).by_group["peft"]["total"] == sum(2 * r * (i + o) for i, o in layers)


def test_rslora_scales_by_alpha_over_sqrt_rank(model):
    model = apply_method(model, method("lora", rank=16, alpha=8.0, use_rslora=True))
    qkv = model.backbone.net.blocks[0].attn.qkv
    assert qkv.scaling["default"] == pytest.approx(8.0 / 4.0)


def test_ia3_scales_outputs_and_feedforward_inputs(model):
    blocks = model.backbone.net.blocks
    expected = sum(b.attn.qkv.out_features + b.mlp.fc1.in_features + b.mlp.fc2.in_features for b in blocks)
    model = apply_method(model, method("ia3"))
    counts = count_parameters(model)
    assert counts.by_group["peft"]["total"] == counts.by_group["peft"]["trainable"] == expected


def test_ia3_feedforward_must_be_targeted(model):
    with pytest.raises(UserError, match="add them to method.targets"):
        apply_method(model, method("ia3", targets=["attn_qkv"], feedforward=["mlp"]))


def test_lokr_trains_only_its_factors_and_the_heads(model):
    model = apply_method(model, method("lokr", rank=4))
    counts = count_parameters(model)
    assert counts.by_group["peft"]["trainable"] == counts.by_group["peft"]["total"] > 0
    assert counts.by_group["backbone"]["trainable"] == 0
    assert counts.by_group["task_heads"]["trainable"] == counts.by_group["task_heads"]["total"]


def test_heads_target_group_wraps_the_roi_linears(model):
    from peft.tuners.tuners_utils import BaseTunerLayer
    model = apply_method(model, method("lora", targets=["task_heads"], train_task_layers=False))
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer))
    assert wrapped == ["roi_heads.box_head.fc1", "roi_heads.box_predictor.bbox_pred",
                       "roi_heads.box_predictor.cls_score"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_" in n}


def test_bitfit_trains_every_bias_plus_neck_and_heads(model):
    model = apply_method(model, method("bitfit"))
    family = model.peftseg_facts.family
    for name, p in model.named_parameters():
        expect = name.endswith(".bias") or family.group_of(name) in ("neck", "task_heads")
        assert p.requires_grad == expect, name
    counts = count_parameters(model)
    biases = sum(p.numel() for n, p in model.named_parameters() if n.startswith("backbone.net.") and n.endswith(".bias"))
    assert counts.by_group["backbone"]["trainable"] == biases > 0


@pytest.mark.parametrize("name,field", [("loha", "rank"), ("lokr", "rank")])
def test_rank_must_be_positive_for_every_low_rank_method(model, name, field):
    with pytest.raises(UserError, match=rf"method\.{field} must be an integer at least 1"):
        apply_method(model, method(name, **{field: 0}))


def test_one_module_cannot_take_two_peft_methods(model):
    model = apply_method(model, method("lora", targets=["attn_qkv"]))
    with pytest.raises(UserError, match="already wraps"):
        apply_method(model, method("loha", targets=["attn_qkv"]))


def test_the_adapter_name_is_the_caller_s_and_a_layer_takes_one_adapter_of_each_name(model):
    """apply_method(..., adapter_name=…) names the peft adapter (peft's multi-adapter API): a second
    name joins the layers the first adapts and trains alone; the same name twice is refused."""
    from peftseg.methods._peft import adapters_in

    model = apply_method(model, method("lora", targets=["attn_qkv"]), adapter_name="cats")
    qkv = linear(model, "backbone.net.blocks.0.attn.qkv")
    assert adapters_in(qkv) == {"cats"}
    model = apply_method(model, method("lora", targets=["attn_qkv"], rank=2), adapter_name="dogs")
    assert adapters_in(qkv) == {"cats", "dogs"} and qkv.lora_A["dogs"].out_features == 2
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert trained and all(".dogs." in n for n in trained)
    with pytest.raises(UserError, match="already wraps"):
        apply_method(model, method("lora", targets=["attn_qkv"]), adapter_name="dogs")


def test_adapter_lora_trains_the_union_and_starts_at_the_base_output(base, model):
    from peftseg.registry import METHODS
    cfg = preset("method", "adapter_lora", METHODS.get("adapter_lora").config)
    model = apply_method(model, cfg).eval()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("peft_adapters." in n for n in names) and any("lora_" in n for n in names)
    assert not any(n.startswith("backbone.net.") and "peft_adapters." not in n and "lora_" not in n for n in names)
    depth, d = len(model.backbone.net.blocks), model.backbone.net.blocks[0].attn.proj.out_features
    b, n_ad = cfg.adapter.bottleneck or min(64, d // 4), cfg.adapter.adapters_per_block
    lora = sum(cfg.lora.rank * (m.in_features + m.out_features) for m in qkv_and_proj(base))
    expected = depth * 2 * n_ad * (2 * d * b + d + b) + lora
    assert count_parameters(model).by_group["peft"]["trainable"] == expected
    batch = images()
    fb, fm = features(base, batch), features(model, batch)
    assert all(torch.equal(fb[k], fm[k]) for k in fb)


def test_merge_refuses_adapters_and_folds_loha_and_dora(base):
    from peftseg.registry import METHODS
    from peftseg.checkpoint.merge import merge_and_unload
    adapted = apply_method(copy.deepcopy(base), preset("method", "adapter", METHODS.get("adapter").config))
    with pytest.raises(UserError, match="non-linear"):
        merge_and_unload(adapted)
    batch = images()
    for name, kw in (("loha", {}), ("lora", {"use_dora": True}), ("ia3", {})):
        model = apply_method(copy.deepcopy(base), method(name, **kw)).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # make every update non-trivial before folding it in
            for n, p in model.named_parameters():
                if any(k in n for k in ("lora_", "hada_", "ia3_")):
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        before = features(model, batch)
        merged = merge_and_unload(model)
        assert not any(k in n for n, _ in merged.named_parameters() for k in ("lora_", "hada_", "ia3_"))
        after = features(merged, batch)
        assert not all(torch.equal(before[k], v) for k, v in features(base, batch).items())
        for k in before:
            # folding rounds each weight once and makes two matmuls one: a few ulps per adapted layer
            # (measured <= 4 over the 4 blocks); 32 ulps of the feature's max, as in test_checkpoints
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=ulps(before[k], 32))
