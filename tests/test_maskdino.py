"""Family `maskdino`: presets, FamilyMap (adapter sites, LoRA groups, task heads), the
study's adapter and LoRA placements, the training objective and the Swin ImageNet weight
layout. Every method on its tiny preset: tests/test_contract.py."""

import copy
import re

import pytest
import torch
from detectron2.utils.events import EventStorage
from peft.tuners.tuners_utils import BaseTunerLayer

from helpers import preset, shapes_batch
from peftseg.config import schemas
from peftseg.errors import UserError
from peftseg.methods import apply_method
from peftseg.methods._adapter_layers import AdapterStack
from peftseg.models import build_model
from peftseg.models.maskdino import FAMILY, MaskDinoConfig
from peftseg.models._weights import load_weights
from peftseg.params import count_parameters

ENC = "sem_seg_head.pixel_decoder.transformer.encoder.layers"
DEC = "sem_seg_head.predictor.decoder.layers"


def tiny(num_classes: int = 3, **overrides):
    torch.manual_seed(0)
    return build_model(preset("model", "maskdino_tiny", MaskDinoConfig, **overrides), num_classes)


@pytest.fixture(scope="module")
def model():
    return tiny().eval()


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    return shapes_batch(tmp_path_factory.mktemp("maskdino_shapes"), n=2)


def method(name, **overrides):
    return preset("method", name, schemas()["method"][name], **overrides)


def images(n=1, size=128):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8),
             "height": size, "width": size} for _ in range(n)]


def test_presets_compose_with_the_published_shapes():
    r50 = preset("model", "maskdino_r50", MaskDinoConfig)
    assert (r50.backbone, r50.resnet_depth, list(r50.encoder_in_features), r50.total_num_feature_levels,
            r50.num_queries, r50.dec_layers, r50.enc_layers, r50.hidden_dim, r50.dn) == \
        ("resnet", 50, ["res3", "res4", "res5"], 3, 300, 9, 6, 256, "seg")
    swin_l = preset("model", "maskdino_swin_l", MaskDinoConfig)
    assert (swin_l.embed_dim, list(swin_l.depths), swin_l.window_size, swin_l.total_num_feature_levels,
            swin_l.feature_order, swin_l.enc_dim_feedforward) == (192, [2, 2, 18, 2], 12, 5, "low2high", 2048)


@pytest.mark.parametrize("key,value,needle", [
    ("feature_order", "sideways", "feature_order"),
    ("hidden_dim", 128, "hidden_dim"),
    ("encoder_in_features", ["res6"], "encoder_in_features"),
    ("total_num_feature_levels", 2, "total_num_feature_levels"),
    ("dn_noise_scale", 1.5, "dn_noise_scale"),
    ("num_queries", 0, "num_queries"),
    ("num_heads", [1, 2, 3, 8], "num_heads"),
    ("clip_grad_norm", -1.0, "clip_grad_norm"),
])
def test_bad_values_fail_with_the_key_named(key, value, needle):
    with pytest.raises(UserError, match=needle):
        tiny(**{key: value})


def test_family_map_sites_and_lora_groups_match_the_study_layout(model):
    names = [n for n, _ in model.named_modules()]

    def hits(pattern):
        return [n for n in names if re.fullmatch(pattern, n)]

    enc, dec = 2, 3  # maskdino_tiny: 2 encoder layers, 3 decoder layers
    attn = hits(FAMILY.adapter_sites["attn"])
    assert len([n for n in attn if n.startswith(ENC)]) == enc
    assert sorted(n.rsplit(".", 1)[1] for n in attn if n.startswith(DEC)) == ["cross_attn"] * dec + ["self_attn"] * dec
    counts = {group: len(hits(p)) for group, p in FAMILY.lora_targets.items()}
    assert counts == {
        "deform_attn": 4 * enc, "decoder_deform_attn": 4 * dec,
        "encoder_attn": 4 * enc, "decoder_cross_attn": 4 * dec,  # the study grid's neutral names
        "sampling_offsets": enc + dec, "attention_weights": enc + dec, "value_proj": enc + dec,
        "output_proj": enc + dec, "decoder_self_attn": dec,
        "attn_qkv": 5, "attn_proj": 5, "mlp": 10,  # Swin depths [1, 1, 2, 1]
        "task_heads": 1 + 3 + 3,  # class head, mask MLP, the shared box MLP (under its first name)
        # input projections of the 3 encoder levels, the stride-4 lateral and output convs, mask features;
        # the ResNet group matches nothing on this Swin backbone (LoRA refuses it by name there)
        "pixel_decoder_conv": 3 + 2 + 1, "backbone_conv": 0,
    }
    heads = {n for n, _ in model.named_parameters() if FAMILY.group_of(n) == "task_heads"}
    assert any(".class_embed." in n for n in heads) and any(".bbox_embed.0." in n for n in heads)
    assert not any(n.startswith(("backbone.", "sem_seg_head.pixel_decoder.", f"{DEC}.")) for n in heads)


def test_adapters_follow_each_attention_and_start_as_identity(model):
    m = apply_method(copy.deepcopy(model), method("adapter", adapters_per_block=2, sites=["attn"]))
    stacks = {n: mod.peft_adapters for n, mod in m.named_modules() if isinstance(getattr(mod, "peft_adapters", None), AdapterStack)}
    assert len(stacks) == 2 + 2 * 3 and all(len(s) == 2 for s in stacks.values())
    with torch.no_grad():
        ref, got = model(images())[0]["instances"], m.eval()(images())[0]["instances"]
    assert torch.equal(ref.scores, got.scores)


def test_lora_on_deformable_attention_wraps_encoder_and_decoder(model):
    m = apply_method(copy.deepcopy(model), method("lora", targets=["deform_attn", "decoder_deform_attn", "decoder_self_attn"]))
    wrapped = {n for n, mod in m.named_modules() if isinstance(mod, BaseTunerLayer)}
    assert len(wrapped) == 4 * 2 + 4 * 3 + 3
    counts = count_parameters(m)
    assert counts.by_group["peft"]["trainable"] > 0


def test_training_step_gives_every_official_loss_term(batch):
    m = tiny().train()
    with EventStorage():
        losses = m(batch)
    kinds = ("loss_ce", "loss_mask", "loss_dice", "loss_bbox", "loss_giou")
    # last layer, 3 earlier predictions (incl. the selected queries), interm, and dn for each
    expected = {f"{k}{s}" for k in kinds for s in ["", "_interm", "_dn", *[f"_{i}" for i in range(3)],
                                                   *[f"_dn_{i}" for i in range(3)]]}
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    total = sum(losses.values())
    total.backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "sem_seg_head.predictor.label_enc.weight" in grads  # denoising queries were used
    assert any(n.startswith(f"{ENC}.0.self_attn.sampling_offsets") for n in grads)


def test_official_swin_imagenet_weights_load_into_the_backbone(tmp_path, model):
    # an official Swin state dict: backbone names without prefix, plus the classifier and the
    # final norm that detection backbones drop
    state = {k[len("backbone."):]: v.clone() + 1.0 for k, v in model.state_dict().items()
             if k.startswith("backbone.") and not re.match(r"backbone\.norm\d", k)}
    state.update({"norm.weight": torch.ones(256), "norm.bias": torch.zeros(256),
                  "head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)})
    torch.save({"model": state}, tmp_path / "swin.pth")
    m = tiny()
    report = load_weights(m, str(tmp_path / "swin.pth"))
    qkv = "backbone.layers.2.blocks.1.attn.qkv.weight"
    assert torch.equal(m.state_dict()[qkv], state[qkv[len("backbone."):]])
    assert set(report.unexpected) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert not any(k.startswith("backbone.") and not re.match(r"backbone\.norm\d", k) for k in report.missing)
