"""Model family `vitdet`: presets build, train/eval forwards work, weights load."""

import math
import os
from pathlib import Path

import detectron2
import pytest
import torch

import helpers
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from peftseg.errors import UserError
from peftseg.models import build_model, family_of
from peftseg.models.vitdet import FAMILY
from peftseg.models._weights import load_weights
from peftseg.params import count_parameters

CONF = Path(__file__).resolve().parent.parent / "conf"
LOSSES = {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}


def preset(name: str, **overrides):
    return helpers.preset("model", name, **overrides)


def fake_batch(n: int, size: int = 128, polygons: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(n)
    batch = []
    for _ in range(n):
        boxes = torch.tensor([[10.0, 12.0, 60.0, 50.0], [70.0, 64.0, 120.0, 118.0]])
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.tensor([0, 2])
        if polygons:
            inst.gt_masks = PolygonMasks(
                [[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in boxes.tolist()]
            )
        else:
            masks = torch.zeros(len(boxes), size, size, dtype=torch.bool)
            for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                masks[i, y0:y1, x0:x1] = True
            inst.gt_masks = BitMasks(masks)
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "instances": inst, "height": size, "width": size})
    return batch


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(preset("vitdet_tiny"), num_classes=3)


@pytest.mark.parametrize("polygons", [False, True], ids=["bitmasks", "polygons"])
def test_tiny_train_forward_returns_finite_losses(tiny, polygons):
    tiny.train()
    with EventStorage():
        losses = tiny(fake_batch(2, polygons=polygons))
    assert set(losses) == LOSSES
    assert all(torch.isfinite(v) for v in losses.values()), losses


def test_tiny_eval_forward_returns_masks(tiny):
    tiny.eval()
    with torch.no_grad():
        out = tiny(fake_batch(2))
    assert len(out) == 2
    inst = out[0]["instances"]
    assert inst.has("pred_masks") and inst.has("pred_boxes") and inst.has("scores")
    assert inst.pred_masks.shape[-2:] == (128, 128)
    assert len(inst) <= preset("vitdet_tiny").detections_per_image


def vit_b_backbone_params() -> int:
    """Closed form for detectron2's ViT-B as ViTDet configures it (1024 px, window 14)."""
    e, depth, p, mlp = 768, 12, 16, 4 * 768
    head_dim = e // 12
    patch_embed = 3 * p * p * e + e
    pos_embed = (224 // p) ** 2 * e + e  # pretraining grid + cls token
    block = 2 * 2 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * mlp + mlp) + (mlp * e + e)
    rel_pos_window = 2 * (2 * 14 - 1) * head_dim
    rel_pos_global = 2 * (2 * (1024 // p) - 1) * head_dim
    return patch_embed + pos_embed + depth * block + 8 * rel_pos_window + 4 * rel_pos_global


def test_vitdet_b_matches_model_zoo_shape():
    cfg = preset("vitdet_b")
    model = build_model(cfg, num_classes=80)
    counts = count_parameters(model)
    backbone = counts.by_group["backbone"]["total"]
    assert backbone == vit_b_backbone_params()
    assert math.isclose(backbone / 1e6, 85.9, abs_tol=0.1)

    # the same graph as detectron2's own LazyConfig, module for module and shape for shape
    zoo_file = os.path.join(
        os.path.dirname(detectron2.__file__), "model_zoo/configs/common/models/mask_rcnn_vitdet.py"
    )
    zoo_cfg = LazyConfig.load(zoo_file)
    zoo_cfg.model.roi_heads.num_classes = 80
    zoo = instantiate(zoo_cfg.model)
    # model.attention=efficient (default) swaps in a subclass with the same parameters
    assert repr(zoo) == repr(model).replace("EfficientAttention(", "Attention(")
    assert {k: v.shape for k, v in zoo.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_family_map_attached(tiny):
    assert family_of(tiny) is FAMILY
    assert tiny.peftseg_facts.family.adapter_sites["attn"] == r"backbone\.net\.blocks\.\d+\.attn"


def test_unknown_family_is_a_user_error():
    with pytest.raises(UserError, match="vitdet"):
        build_model(preset("vitdet_tiny", family="nope"), num_classes=3)


def test_inconsistent_anchor_sizes_is_a_user_error():
    with pytest.raises(UserError, match="anchor_sizes"):
        build_model(preset("vitdet_tiny", scale_factors=[1.0, 0.5]), num_classes=3)


def test_weights_round_trip(tiny, tmp_path):
    DetectionCheckpointer(tiny, save_dir=str(tmp_path)).save("tiny")
    path = tmp_path / "tiny.pth"
    torch.manual_seed(1)
    fresh = build_model(preset("vitdet_tiny", weights=str(path)), num_classes=3)
    saved, loaded = tiny.state_dict(), fresh.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_weights_with_other_num_classes_load_all_but_predictors(tiny, tmp_path):
    DetectionCheckpointer(tiny, save_dir=str(tmp_path)).save("tiny")
    fresh = build_model(preset("vitdet_tiny"), num_classes=5)
    report = load_weights(fresh, str(tmp_path / "tiny.pth"))
    assert report.shape_mismatch and all("predictor" in k for k in report.shape_mismatch)
    assert set(report.missing) == set(report.shape_mismatch)
    assert len(report.loaded) == len(fresh.state_dict()) - len(report.shape_mismatch)


def test_missing_weights_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_model(preset("vitdet_tiny", weights=str(tmp_path / "nope.pth")), num_classes=3)


def test_checkpoint_without_matching_keys_is_a_user_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"encoder.layer.0.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(UserError, match="matched no parameter"):
        build_model(preset("vitdet_tiny", weights=str(path)), num_classes=3)
