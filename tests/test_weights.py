"""model.weights: detectron2 checkpoints, timm/MAE ViT and official Swin state dicts land in
the model (values checked), position tables are resized, and misfits fail with the fix."""

import logging
from pathlib import Path

import pytest
import torch

import helpers
import torch.nn.functional as F
from helpers import ulps
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling.backbone.utils import get_abs_pos

from peftseg.errors import UserError
from peftseg.models import build_model
from peftseg.models._weights import load_weights

CONF = Path(__file__).resolve().parent.parent / "conf"
VIT, SWIN = "backbone.net.", "backbone.bottom_up."


def preset(name: str, **overrides):
    return helpers.preset("model", name, **overrides)


def build(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(preset(name, **overrides), num_classes=3)


def backbone_only(model, prefix: str) -> dict:
    return {k[len(prefix):]: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def timm_vit_state(model) -> dict:
    """A detectron2 ViT's weights under timm/MAE names, with the extras such files carry."""
    state = {k: v for k, v in backbone_only(model, VIT).items() if ".rel_pos_" not in k}  # MAE has none
    dim = state["pos_embed"].shape[-1]
    state.update({
        "cls_token": torch.randn(1, 1, dim), "norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim),
        "head.weight": torch.randn(1000, dim), "head.bias": torch.zeros(1000),
        "mask_token": torch.randn(1, 1, 32), "decoder_embed.weight": torch.randn(32, dim),
    })
    return state


def official_swin_state(model, timm_layout: bool = False) -> dict:
    """A detectron2 SwinTransformer's weights under the Swin repository's names: its final
    norm and classifier instead of detectron2's per-stage output norms, plus the attention
    masks some releases saved. timm's layout moves each PatchMerging one stage later."""
    state = {k: v for k, v in backbone_only(model, SWIN).items() if not k.startswith("norm")}
    width = model.backbone.bottom_up.num_features[-1]
    state.update({
        "norm.weight": torch.ones(width), "norm.bias": torch.zeros(width),
        "head.weight": torch.randn(1000, width), "head.bias": torch.zeros(1000),
        "layers.0.blocks.1.attn_mask": torch.zeros(64, 16, 16),
    })
    if timm_layout:
        def shift(k):
            parts = k.split(".")
            if parts[0] == "layers" and parts[2] == "downsample":
                parts[1] = str(int(parts[1]) + 1)
            return ".".join(parts)
        state = {shift(k): v for k, v in state.items()}
        state["head.fc.weight"] = state.pop("head.weight")
        state["head.fc.bias"] = state.pop("head.bias")
    return state


def test_detectron2_checkpoint_of_a_swin_round_trips(tmp_path):
    source = build("swin_tiny", seed=0)
    DetectionCheckpointer(source, save_dir=str(tmp_path)).save("swin")
    model = build("swin_tiny", seed=1, weights=str(tmp_path / "swin.pth"))
    saved, loaded = source.state_dict(), model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


@pytest.mark.parametrize("suffix", ["", "?matching_heuristics=True"], ids=["plain", "heuristics-flag"])
def test_timm_vit_state_dict_maps_onto_vitdet_and_resizes_pos_embed(tmp_path, suffix, caplog):
    # pretrained at 224 px (14x14 grid); the model's table is for 128 px (8x8)
    source = build("vitdet_tiny", seed=0, pretrain_img_size=224)
    state = timm_vit_state(source)
    assert state["pos_embed"].shape == (1, 1 + 14 * 14, 96)
    path = tmp_path / "mae_tiny.pth"
    torch.save({"model": state}, path)  # MAE nests its weights under "model"

    model = build("vitdet_tiny", seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="peftseg.models._weights"):
        report = load_weights(model, str(path) + suffix)
    ours = model.state_dict()
    for k in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.bias", "blocks.2.norm1.weight"):
        assert torch.equal(ours[VIT + k], state[k]), k
    pos = ours[VIT + "pos_embed"]
    assert pos.shape == (1, 1 + 8 * 8, 96)
    # the 8x8 grid is what detectron2's ViT itself makes of the 14x14 table at run time
    expected = get_abs_pos(state["pos_embed"], True, (8, 8)).reshape(1, 64, 96)
    # the same bicubic F.interpolate of the same table (measured: equal); a kernel may sum its 16 taps
    # in another order: 16 ulps of the table
    torch.testing.assert_close(pos[:, 1:], expected, rtol=0, atol=ulps(expected, 16))
    assert torch.equal(pos[:, :1], state["pos_embed"][:, :1])
    # what MAE has no counterpart for stays at its init and is reported
    assert set(report.unexpected) == {"cls_token", "norm.weight", "norm.bias", "head.weight", "head.bias",
                                      "mask_token", "decoder_embed.weight"}
    assert all(torch.equal(ours[k], before[k]) for k in ours if ".rel_pos_" in k or not k.startswith(VIT))
    assert len(report.loaded) == len(state) - len(report.unexpected)
    assert not report.shape_mismatch
    assert f"loaded {len(report.loaded)}" in caplog.text and "unexpected 7" in caplog.text


def test_timm_vit_without_a_cls_slot_gets_one(tmp_path):
    source = build("vitdet_tiny", seed=0)
    state = timm_vit_state(source)
    state["pos_embed"] = state["pos_embed"][:, 1:]  # timm's class_token=False models
    torch.save(state, tmp_path / "vit.pth")
    model = build("vitdet_tiny", seed=1)
    init_cls = model.state_dict()[VIT + "pos_embed"][:, :1].clone()
    load_weights(model, str(tmp_path / "vit.pth"))
    pos = model.state_dict()[VIT + "pos_embed"]
    assert torch.equal(pos[:, 1:], state["pos_embed"]) and torch.equal(pos[:, :1], init_cls)


@pytest.mark.parametrize("timm_layout", [False, True], ids=["official", "timm"])
def test_swin_state_dict_maps_onto_the_swin_family(tmp_path, timm_layout):
    source = build("swin_tiny", seed=0)
    state = official_swin_state(source, timm_layout)
    torch.save({"model": state}, tmp_path / "swin.pth")
    model = build("swin_tiny", seed=1, weights=str(tmp_path / "swin.pth"))
    ours, theirs = model.state_dict(), source.state_dict()
    landed = [k for k in theirs if k.startswith(SWIN) and not k.startswith(SWIN + "norm")]
    assert len(landed) > 100 and all(torch.equal(ours[k], theirs[k]) for k in landed)
    assert torch.equal(ours[SWIN + "layers.2.downsample.reduction.weight"],
                       theirs[SWIN + "layers.2.downsample.reduction.weight"])
    # detectron2's per-stage output norms are not in a classifier checkpoint
    report = load_weights(model, str(tmp_path / "swin.pth"))
    assert {SWIN + f"norm{i}.weight" for i in range(4)} <= set(report.missing)
    assert "layers.0.blocks.1.attn_mask" in report.unexpected and not report.shape_mismatch


def test_swin_bias_tables_are_resized_to_the_models_window(tmp_path):
    source = build("swin_tiny", seed=0, window_size=2)  # tables of (2·2-1)² = 9 rows
    state = official_swin_state(source)
    torch.save({"model": state}, tmp_path / "swin_w2.pth")
    model = build("swin_tiny", seed=1, weights=str(tmp_path / "swin_w2.pth"))  # window 4: 49 rows
    key = "layers.1.blocks.0.attn.relative_position_bias_table"
    table = model.state_dict()[SWIN + key]
    assert state[key].shape == (9, 2) and table.shape == (49, 2)
    expected = F.interpolate(state[key].T.reshape(1, 2, 3, 3), size=(7, 7), mode="bicubic", align_corners=False)
    # as for pos_embed: the same 16-tap bicubic interpolation, 16 ulps of the table
    torch.testing.assert_close(table, expected.reshape(2, 49).T, rtol=0, atol=ulps(expected, 16))
    # the index is derived from the model's own window, never taken from the checkpoint
    index = model.state_dict()[SWIN + "layers.1.blocks.0.attn.relative_position_index"]
    assert index.shape == (16, 16) and index.max() == 48
    qkv = "layers.1.blocks.0.attn.qkv.weight"
    assert torch.equal(model.state_dict()[SWIN + qkv], state[qkv])


def test_neck_and_head_misfits_stay_at_init_and_are_reported(tmp_path):
    source = build("swin_tiny", seed=0, out_channels=32)
    DetectionCheckpointer(source, save_dir=str(tmp_path)).save("narrow")
    model = build("swin_tiny", seed=1)
    report = load_weights(model, str(tmp_path / "narrow.pth"))
    assert report.shape_mismatch and not any(k.startswith(SWIN) for k in report.shape_mismatch)
    assert any(k.startswith("backbone.fpn_") for k in report.shape_mismatch)
    key = SWIN + "layers.0.blocks.0.attn.qkv.weight"
    assert torch.equal(model.state_dict()[key], source.state_dict()[key])


def test_a_larger_vit_is_refused_naming_the_key_and_both_shapes(tmp_path):
    # the leading tensors of a ViT-B/16 MAE file
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(768, 3, 16, 16),
                          "patch_embed.proj.bias": torch.zeros(768),
                          "pos_embed": torch.zeros(1, 197, 768), "cls_token": torch.zeros(1, 1, 768),
                          "blocks.0.attn.qkv.weight": torch.zeros(2304, 768)}}, tmp_path / "vit_b.pth")
    with pytest.raises(UserError) as err:
        build("vitdet_tiny", weights=str(tmp_path / "vit_b.pth"))
    msg = str(err.value)
    assert "backbone.net.patch_embed.proj.weight" in msg
    assert "(768, 3, 16, 16)" in msg and "(96, 3, 16, 16)" in msg
    assert "model=vitdet_b" in msg


def test_a_detectron2_vitdet_b_checkpoint_into_vitdet_tiny_is_refused(tmp_path):
    state = {k: torch.zeros(s) for k, s in {
        "backbone.net.blocks.0.attn.qkv.weight": (2304, 768),
        "backbone.net.blocks.0.attn.qkv.bias": (2304,)}.items()}
    torch.save({"model": state}, tmp_path / "vitdet_b.pth")
    with pytest.raises(UserError, match=r"qkv\.weight has shape \(2304, 768\) in the checkpoint but \(288, 96\)"):
        build("vitdet_tiny", weights=str(tmp_path / "vitdet_b.pth"))


def test_a_swin_state_dict_into_vitdet_is_refused(tmp_path):
    torch.save({"model": official_swin_state(build("swin_tiny"))}, tmp_path / "swin.pth")
    with pytest.raises(UserError, match="official Swin state dict.*only the 'maskdino' or 'swin' model families take, but the model is 'vitdet'.*model=swin_t"):
        build("vitdet_tiny", weights=str(tmp_path / "swin.pth"))


def test_a_vit_state_dict_into_swin_is_refused(tmp_path):
    torch.save(timm_vit_state(build("vitdet_tiny")), tmp_path / "vit.pth")
    with pytest.raises(UserError, match="timm/MAE ViT state dict.*'vitdet' model family.*'swin'"):
        build("swin_tiny", weights=str(tmp_path / "vit.pth"))


def test_a_path_that_does_not_exist_names_the_fix(tmp_path):
    with pytest.raises(UserError, match=r"does not exist.*model\.weights=''"):
        build("swin_tiny", weights=str(tmp_path / "nope" / "swin_tiny_patch4_window7_224.pth"))
