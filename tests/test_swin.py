"""Model family `swin`: presets build to the published sizes, forwards work, the family map
names exactly the Swin blocks' modules, and methods see it like any other family."""

import copy
import math
import re
from pathlib import Path

import pytest
import torch

import helpers
from omegaconf import OmegaConf
from detectron2.modeling import FPN, SwinTransformer
from detectron2.utils.events import EventStorage

from helpers import run_in_process, shapes_batch
from conftest import records_under
from peftseg.errors import UserError
from peftseg.methods import apply_method
from peftseg.methods.heads import HeadsConfig
from peftseg.methods.lora import LoraConfig
from peftseg.models import build_model, family_of
from peftseg.models.swin import FAMILY
from peftseg.params import count_parameters

CONF = Path(__file__).resolve().parent.parent / "conf"
LOSSES = {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}


def preset(name: str, **overrides):
    return helpers.preset("model", name, **overrides)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(preset("swin_tiny"), num_classes=3)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    return shapes_batch(tmp_path_factory.mktemp("swin"), n=2)


def test_tiny_is_detectron2_swin_in_an_fpn(tiny):
    assert isinstance(tiny.backbone, FPN) and isinstance(tiny.backbone.bottom_up, SwinTransformer)
    assert list(tiny.backbone.output_shape()) == ["p2", "p3", "p4", "p5", "p6"]
    assert family_of(tiny) is FAMILY
    total = count_parameters(tiny).total
    assert 300_000 < total < 2_000_000


def test_tiny_train_forward_returns_finite_losses(tiny, batch):
    tiny.train()
    with EventStorage():
        losses = tiny(batch)
    assert set(losses) == LOSSES
    assert all(torch.isfinite(v) for v in losses.values()), losses


def test_tiny_eval_forward_returns_masks(tiny, batch):
    tiny.eval()
    with torch.no_grad():
        out = tiny([{k: d[k] for k in ("image", "height", "width")} for d in batch])
    assert len(out) == 2
    inst = out[0]["instances"]
    assert inst.has("pred_masks") and inst.has("pred_boxes") and inst.has("scores")
    h, w = batch[0]["height"], batch[0]["width"]
    assert inst.pred_masks.shape[1:] == (h, w)
    assert len(inst) <= preset("swin_tiny").detections_per_image


def matches(model, pattern):
    return [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]


def test_family_map_names_every_block_exactly(tiny):
    blocks = sum(preset("swin_tiny").depths)
    expected = {"attn": blocks, "mlp": blocks}
    for site, n in expected.items():
        found = matches(tiny, FAMILY.adapter_sites[site])
        assert len(found) == n, (site, found)
    assert all(type(tiny.get_submodule(n)).__name__ == "WindowAttention"
               for n in matches(tiny, FAMILY.adapter_sites["attn"]))
    expected = {"attn_qkv": blocks, "attn_proj": blocks, "mlp": 2 * blocks, "task_heads": 3}
    for group, n in expected.items():
        found = matches(tiny, FAMILY.lora_targets[group])
        assert len(found) == n, (group, found)
        assert all(isinstance(tiny.get_submodule(m), torch.nn.Linear) for m in found)
    assert matches(tiny, FAMILY.lora_targets["attn_qkv"])[-1] == "backbone.bottom_up.layers.3.blocks.1.attn.qkv"
    assert set(matches(tiny, FAMILY.lora_targets["task_heads"])) == {
        "roi_heads.box_head.fc1", "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"}


def test_every_parameter_is_in_backbone_neck_or_heads(tiny):
    counts = count_parameters(tiny)
    g = counts.by_group
    assert g["other"]["total"] == 0 and g["peft"]["total"] == 0
    assert g["backbone"]["total"] == sum(p.numel() for p in tiny.backbone.bottom_up.parameters())
    assert g["neck"]["total"] == sum(p.numel() for p in tiny.backbone.parameters()) - g["backbone"]["total"]
    assert g["task_heads"]["total"] == sum(
        p.numel() for m in (tiny.proposal_generator, tiny.roi_heads) for p in m.parameters())
    assert counts.total == sum(p.numel() for p in tiny.parameters())


def test_heads_method_freezes_exactly_the_swin(tiny):
    model = apply_method(copy.deepcopy(tiny), HeadsConfig())
    counts = count_parameters(model)
    assert counts.by_group["backbone"]["trainable"] == 0
    assert counts.trainable == counts.total - counts.by_group["backbone"]["total"]


def test_lora_on_attn_qkv_adds_rank_times_in_plus_out_per_block(tiny):
    rank = 4
    cfg = OmegaConf.structured(LoraConfig(rank=rank, targets=["attn_qkv"], train_task_layers=False))
    model = apply_method(copy.deepcopy(tiny), cfg)
    c = preset("swin_tiny")
    # a block of stage i is embed_dim·2^i wide; its qkv maps that to three times as much
    expected = sum(depth * rank * (d + 3 * d) for depth, d in
                   ((depth, c.embed_dim * 2**i) for i, depth in enumerate(c.depths)))
    counts = count_parameters(model)
    assert counts.by_group["peft"]["total"] == expected
    assert counts.trainable == expected
    assert counts.total == count_parameters(tiny).total + expected


# ImageNet classifiers as published (timm / the Swin repository), less their 1000-way head
# and final norm, plus detectron2's four per-stage output norms
SWIN_T_CLS, SWIN_B_CLS = 28_288_354, 87_768_224


def swin_detection_backbone(classifier: int, widths: list[int]) -> int:
    head = widths[-1] * 1000 + 1000
    return classifier - head - 2 * widths[-1] + sum(2 * w for w in widths)


# Built on the CPU: detectron2's SwinTransformer calls .item() in __init__, which the meta
# device refuses. About 5 s each.
@pytest.mark.parametrize("name, classifier, embed, published", [
    ("swin_t", SWIN_T_CLS, 96, 48), ("swin_b", SWIN_B_CLS, 128, 107)])
def test_published_shapes(name, classifier, embed, published):
    counts = count_parameters(build_model(preset(name), num_classes=80))
    backbone = counts.by_group["backbone"]["total"]
    assert backbone == swin_detection_backbone(classifier, [embed * 2**i for i in range(4)])
    # ViTDet's heads (LN, 2-conv RPN, 4conv1fc box head) are 1.9M larger than the
    # published models' mmdet heads; the next test builds those
    assert math.isclose(counts.total / 1e6, published + 2, abs_tol=0.5)


def test_published_swin_t_count_with_mmdet_heads():
    """Swin-T Mask R-CNN as the Swin paper counts it (48M): 1-conv RPN head, 2fc box head, no norm."""
    cfg = preset("swin_t", rpn_head_convs=1, box_head_convs=0, box_head_fcs=2, norm="")
    total = count_parameters(build_model(cfg, num_classes=80)).total
    assert round(total / 1e6) == 48


@pytest.mark.parametrize("override, needle", [
    ({"depths": [2, 2, 6]}, "4 stages"),
    ({"num_heads": [3, 6, 12, 25]}, "num_heads"),
    ({"anchor_sizes": [32, 64, 128, 256]}, "anchor_sizes"),
])
def test_bad_shapes_are_user_errors(override, needle):
    with pytest.raises(UserError, match=needle):
        build_model(preset("swin_tiny", **override), num_classes=3)


def test_lora_run_on_swin_tiny(tmp_path, shapes_cache):
    run_in_process(tmp_path, shapes_cache, "model=swin_tiny", "method=lora", "train.max_iter=10", "train.warmup_iters=0")
    (record,) = records_under(tmp_path)
    assert record["status"] == "ok"
    assert record["config"]["model.name"] == "swin_tiny"
    assert isinstance(record["metrics"]["segm"]["AP"], float)
    groups = record["params"]["by_group"]
    assert groups["backbone"]["trainable"] == 0 and groups["peft"]["trainable"] > 0
