"""Model family `mask2former`: transformers' Mask2Former as a detectron2 meta-architecture."""

import math
import re
from pathlib import Path

import pytest
import torch

import helpers
import torch.nn as nn
from helpers import run_in_process, shapes_batch, ulps
from conftest import records_under
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.structures import BitMasks, Instances, PolygonMasks
from detectron2.utils.events import EventStorage
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import Mask2FormerConfig as HFMask2FormerConfig
from transformers import Mask2FormerForUniversalSegmentation, SwinConfig

from peftseg.errors import UserError
from peftseg.methods import apply_method
from peftseg.methods.adapter import AdapterConfig
from peftseg.methods.lora import LoraConfig
from peftseg.models import build_model, family_of
from peftseg.models._mask2former import HFMask2Former, hf_config
from peftseg.models.mask2former import FAMILY
from peftseg.models._weights import load_weights
from peftseg.params import count_parameters

CONF = Path(__file__).resolve().parent.parent / "conf"
ENC = "m2f.model.pixel_level_module.decoder.encoder.layers"
DEC = "m2f.model.transformer_module.decoder.layers"
DEFORM_KINDS = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")


def preset(name: str, **overrides):
    return helpers.preset("model", name, **overrides)


def tiny_model(num_classes: int = 3, **overrides) -> HFMask2Former:
    torch.manual_seed(0)
    return build_model(preset("m2f_tiny", **overrides), num_classes=num_classes)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    return shapes_batch(tmp_path_factory.mktemp("m2f_shapes"), n=2)


def wrapped(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def test_tiny_is_small_and_registered(tiny):
    counts = count_parameters(tiny)
    assert counts.total <= 3_000_000
    assert counts.by_group["other"]["total"] == 0
    swin = tiny.m2f.model.pixel_level_module.encoder
    assert counts.by_group["backbone"]["total"] == sum(p.numel() for p in swin.parameters())
    assert isinstance(tiny, HFMask2Former)  # built directly: detectron2's global registry stays untouched (test_layers)
    assert family_of(tiny) is FAMILY
    assert tiny.input_format == "RGB" and tiny.device == torch.device("cpu")


def test_train_losses_are_transformers_weighted_loss_dict(tiny, batch):
    tiny.train()
    torch.manual_seed(1)  # the matcher and the point sampling draw random points
    with EventStorage():
        losses = tiny(batch)
    layers = preset("m2f_tiny").decoder_layers  # deep supervision: one set per prediction
    names = ("loss_cross_entropy", "loss_mask", "loss_dice")
    assert set(losses) == {*names, *(f"{n}_{i}" for n in names for i in range(layers - 1))}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values()), losses

    # the same inputs through transformers' own forward give the same total loss
    images = tiny.preprocess_image(batch)
    mask_labels, class_labels = tiny.targets(batch, tuple(images.tensor.shape[-2:]))
    assert [len(m) for m in mask_labels] == [len(x["instances"]) for x in batch]
    assert all(m.shape[-2:] == images.tensor.shape[-2:] for m in mask_labels)
    torch.manual_seed(1)
    hf = tiny.m2f(pixel_values=images.tensor, mask_labels=mask_labels, class_labels=class_labels)
    total = sum(losses.values())
    # the same weighted terms summed in another order: one rounding per product and per addition
    assert torch.allclose(total, hf.loss, rtol=0, atol=ulps(hf.loss, 2 * len(losses))), (total, hf.loss)


def test_targets_from_bitmasks_match_polygons(tiny, batch):
    inst = batch[0]["instances"]
    h, w = inst.image_size
    as_bits = dict(batch[0], instances=Instances((h, w), gt_classes=inst.gt_classes,
                                                 gt_masks=BitMasks.from_polygon_masks(inst.gt_masks, h, w)))
    (from_poly,), _ = tiny.targets(batch[:1], (160, 160))
    (from_bits,), classes = tiny.targets([as_bits], (160, 160))
    assert torch.equal(from_poly, from_bits) and from_poly[:, h:, :].sum() == 0
    assert classes[0].dtype == torch.int64


def test_image_without_instances_trains(tiny, batch):
    h, w = batch[1]["instances"].image_size
    empty = Instances((h, w), gt_classes=torch.zeros(0, dtype=torch.int64), gt_masks=PolygonMasks([]))
    tiny.train()
    with EventStorage():
        losses = tiny([batch[0], dict(batch[1], instances=empty)])
    assert all(torch.isfinite(v) for v in losses.values())


def test_backward_reaches_every_parameter(batch):
    model = tiny_model()
    model.train()
    with EventStorage():
        sum(model(batch).values()).backward()
    # no trainable parameter without gradient, so DDP needs no find_unused_parameters
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_inference_returns_instances_at_original_size(tiny, batch):
    tiny.eval()
    image = batch[0]["image"][:, :96, :]  # a non-square image, reported at twice its size
    with torch.no_grad():
        (out,) = tiny([{"image": image, "height": 192, "width": 256}])
    inst = out["instances"]
    assert inst.image_size == (192, 256)
    assert inst.pred_masks.dtype == torch.bool and inst.pred_masks.shape[1:] == (192, 256)
    topk = min(preset("m2f_tiny").test_topk_per_image, preset("m2f_tiny").num_queries * 3)
    assert len(inst) == topk
    assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
    assert ((inst.pred_classes >= 0) & (inst.pred_classes < 3)).all()
    assert torch.equal(inst.pred_boxes.tensor, BitMasks(inst.pred_masks).get_bounding_boxes().tensor)


def test_lora_deform_attn_wraps_exactly_the_deformable_linears():
    model = apply_method(tiny_model(), LoraConfig(rank=2, targets=["deform_attn"]))
    layers = preset("m2f_tiny").encoder_layers
    expected = {f"{ENC}.{i}.self_attn.{kind}" for i in range(layers) for kind in DEFORM_KINDS}
    assert wrapped(model) == expected and len(expected) == 4 * layers
    counts = count_parameters(model)
    assert counts.by_group["other"]["total"] == 0
    assert counts.by_group["backbone"]["trainable"] == 0  # frozen backbone by default
    assert counts.by_group["peft"]["trainable"] == counts.by_group["peft"]["total"] > 0
    # the decoders LoRA adapts stay frozen; only the class predictor and mask embedder train
    assert counts.by_group["neck"]["trainable"] == 0
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trained and all(n.startswith(("m2f.class_predictor.", "m2f.model.transformer_module.decoder."
                                          "mask_predictor.mask_embedder.")) for n in trained)


def test_lora_on_sampling_offsets_and_value_proj_only():
    model = apply_method(tiny_model(), LoraConfig(
        rank=2, targets=["deform_sampling_offsets", "deform_value_proj"]))
    layers = preset("m2f_tiny").encoder_layers
    assert wrapped(model) == {
        f"{ENC}.{i}.self_attn.{kind}" for i in range(layers) for kind in ("sampling_offsets", "value_proj")
    }


def test_lora_on_the_decoders_cross_attention_trains_and_merges(batch):
    """peft's MultiheadAttention LoRA (in_proj + out_proj) on the masked cross-attention:
    gradients reach it, and merging gives the same predictions with plain torch modules."""
    from peftseg.checkpoint.merge import merge_and_unload

    model = apply_method(tiny_model(), LoraConfig(rank=2, targets=["decoder_cross_attn"]))
    layers = preset("m2f_tiny").decoder_layers - 1
    outer = {n for n in wrapped(model) if n.endswith("cross_attn")}
    assert outer == {f"{DEC}.{i}.cross_attn" for i in range(layers)}
    model.train()
    with EventStorage():
        sum(model(batch).values()).backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    # (transformers' decoder drops whole layers at random in training: layerdrop = its dropout)
    reached = [n for n, p in lora.items() if p.grad is not None]
    assert any(".out_proj.lora_" in n for n in reached)  # the out_proj update, not only in_proj
    assert any(".cross_attn.lora_" in n for n in reached)
    g = torch.Generator().manual_seed(1)
    for n, p in lora.items():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    model.eval()
    inputs = [{"image": b["image"], "height": 128, "width": 128} for b in batch]
    with torch.no_grad():
        before = model(inputs)
        merged = merge_and_unload(model)
        after = merged(inputs)
    assert not wrapped(merged)
    assert all(type(merged.get_submodule(n)) is nn.MultiheadAttention for n in outer)
    assert all(type(merged.get_submodule(n).out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
               for n in outer)
    for a, b in zip(before, after):
        # merging rounds each folded weight once and replaces x@W + x@BA by one matmul: a few ulps per
        # layer, which the softmax turns into relative error of the score; 64 ulps of it
        torch.testing.assert_close(a["instances"].scores, b["instances"].scores, rtol=0,
                                   atol=ulps(a["instances"].scores, 64))


def test_every_lora_group_selects_linears_of_its_part(tiny):
    cfg = preset("m2f_tiny")
    modules = dict(tiny.named_modules())
    selected = {g: sorted(n for n in modules if re.fullmatch(p, n)) for g, p in FAMILY.lora_targets.items()}
    cross = selected.pop("decoder_cross_attn")
    convs = selected.pop("pixel_decoder_conv")
    # input projections of the 3 encoder levels, the stride-4 lateral and output convs, mask projection
    assert len(convs) == 3 + 2 + 1 and all(isinstance(modules[n], nn.Conv2d) for n in convs)
    assert all(isinstance(modules[n], nn.Linear) for names in selected.values() for n in names)
    assert cross and all(isinstance(modules[n], nn.MultiheadAttention) for n in cross)
    blocks, dec_layers = sum(cfg.depths), cfg.decoder_layers - 1
    assert len(selected["attn_qkv"]) == 3 * blocks
    assert len(selected["attn_proj"]) == blocks and len(selected["mlp"]) == 2 * blocks
    assert len(selected["decoder_attn"]) == 3 * dec_layers
    assert all(".self_attn." in n for n in selected["decoder_attn"])  # never the fused cross-attn
    assert len(selected["task_heads"]) == 1 + 3  # class predictor + the 3-layer mask embedder
    for kind in DEFORM_KINDS:
        assert selected[f"deform_{kind}"] == [f"{ENC}.{i}.self_attn.{kind}" for i in range(cfg.encoder_layers)]
    for group, prefix in (("attn_qkv", "backbone"), ("deform_attn", "neck"), ("decoder_attn", "decoder")):
        assert {FAMILY.group_of(n + ".weight") for n in selected[group]} == {prefix}


def test_adapters_sit_on_attention_and_ffn_outputs(tiny, batch):
    cfg = preset("m2f_tiny")
    model = tiny_model()
    model.eval()
    with torch.no_grad():
        before = model(batch)
    model = apply_method(model, AdapterConfig(adapters_per_block=2, bottleneck=8, sites=["attn", "mlp"]))
    sites = {n for n, m in model.named_modules() if hasattr(m, "peft_adapters")}
    dec = range(cfg.decoder_layers - 1)
    assert sites == (
        {f"{ENC}.{i}.self_attn" for i in range(cfg.encoder_layers)}
        | {f"{DEC}.{i}.{a}" for i in dec for a in ("self_attn", "cross_attn")}
        | {f"{ENC}.{i}.fc2" for i in range(cfg.encoder_layers)} | {f"{DEC}.{i}.fc2" for i in dec}
    )
    widths = {m.peft_adapters[0].down.in_features for n, m in model.named_modules() if n in sites}
    assert widths == {cfg.feature_size} == {cfg.hidden_dim}
    with torch.no_grad():
        after = model(batch)  # identity at init, through the tuple outputs of the attentions
    for a, b in zip(before, after):
        assert torch.equal(a["instances"].pred_masks, b["instances"].pred_masks)
        # the adapters add exact zeros; the tuple-output path may reorder a reduction (measured <= 3 ulps)
        assert torch.allclose(a["instances"].scores, b["instances"].scores, rtol=0,
                              atol=ulps(a["instances"].scores, 64))
    with pytest.raises(UserError, match="mlp_parallel"):
        apply_method(tiny_model(), AdapterConfig(sites=["mlp_parallel"], bottleneck=8))


def test_swin_t_preset_has_the_published_shape():
    cfg = preset("m2f_swin_t")
    model = build_model(cfg, num_classes=80)
    counts = count_parameters(model)
    assert math.isclose(counts.total / 1e6, 47.4, abs_tol=0.1)  # Mask2Former paper: 47 M
    assert counts.by_group["other"]["total"] == 0
    # transformers' defaults are the published Mask2Former (Swin-S depths aside), so a
    # default-config model has exactly our tensors, bar the unused Swin final norm we drop
    ref = Mask2FormerForUniversalSegmentation(HFMask2FormerConfig(
        backbone_config=SwinConfig(depths=[2, 2, 6, 2], drop_path_rate=0.3,
                                   out_features=["stage1", "stage2", "stage3", "stage4"]),
        num_labels=80,
    ))
    ours = {k: v.shape for k, v in model.m2f.state_dict().items()}
    theirs = {k: v.shape for k, v in ref.state_dict().items() if ".swin.layernorm." not in k}
    assert ours == theirs


def test_transformers_checkpoint_dir_loads_with_values(tmp_path):
    source = Mask2FormerForUniversalSegmentation(hf_config(preset("m2f_tiny"), 3))
    source.save_pretrained(tmp_path / "ckpt")
    model = tiny_model(weights=str(tmp_path / "ckpt"))
    report = model.peftseg_facts.weights
    theirs = source.state_dict()
    ours = model.m2f.state_dict()
    assert ours.keys() <= theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert len(report.loaded) == len(ours) and not report.missing and not report.shape_mismatch
    # a plain transformers model has the Swin final norm this wrapper drops: reported, not lost
    assert report.unexpected and all(".swin.layernorm." in k for k in report.unexpected)


def test_transformers_checkpoint_with_other_num_labels_loads_all_but_class_head(tiny, tmp_path):
    tiny.m2f.save_pretrained(tmp_path / "ckpt")
    model = tiny_model(num_classes=5, weights=str(tmp_path / "ckpt"))
    report = model.peftseg_facts.weights
    assert set(report.shape_mismatch) == {
        "m2f.class_predictor.weight", "m2f.class_predictor.bias", "m2f.criterion.empty_weight"
    }
    assert set(report.missing) == set(report.shape_mismatch)
    saved = tiny.m2f.state_dict()
    for k in report.loaded:
        assert torch.equal(model.state_dict()[k], saved[k[len("m2f."):]]), k
    assert model.m2f.class_predictor.out_features == 6


def test_mismatched_transformers_checkpoint_is_a_user_error(tmp_path):
    other = preset("m2f_tiny", embed_dim=48, num_heads=[3, 6, 12, 24], window_size=2,
                   feature_size=96, mask_feature_size=96, hidden_dim=96, num_attention_heads=3,
                   encoder_feedforward_dim=160, dim_feedforward=160, num_queries=10)
    Mask2FormerForUniversalSegmentation(hf_config(other, 7)).save_pretrained(tmp_path / "other")
    with pytest.raises(UserError, match="matched no parameter"):
        tiny_model(weights=str(tmp_path / "other"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        tiny_model(weights=str(tmp_path / "empty"))


@pytest.mark.parametrize("swin", [dict(window_size=2), dict(depths=[1, 1, 3, 1])],
                         ids=["other-window", "deeper"])
def test_checkpoint_of_another_swin_is_a_user_error(tmp_path, swin):
    # everything but the backbone would load; a frozen backbone left partly at init would not
    Mask2FormerForUniversalSegmentation(hf_config(preset("m2f_tiny", **swin), 3)).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="Swin backbone"):
        tiny_model(weights=str(tmp_path))


def test_detectron2_checkpoint_of_the_wrapper_loads(tiny, tmp_path):
    DetectionCheckpointer(tiny, save_dir=str(tmp_path)).save("m2f")
    fresh = tiny_model()
    for p in fresh.parameters():
        nn.init.zeros_(p)
    report = load_weights(fresh, str(tmp_path / "m2f.pth"))
    assert not report.missing and not report.shape_mismatch
    saved, loaded = tiny.state_dict(), fresh.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    again = tiny_model(weights=str(tmp_path / "m2f.pth"))  # and through model.weights
    assert all(torch.equal(saved[k], again.state_dict()[k]) for k in saved)


@pytest.mark.parametrize("bad", [dict(feature_size=48), dict(depths=[2, 2, 2]),
                                 dict(num_heads=[1, 3, 4, 8]), dict(num_attention_heads=5)])
def test_bad_sizes_are_user_errors(bad):
    with pytest.raises(UserError, match="model\\."):
        tiny_model(**bad)


def test_lora_run_on_deformable_attention(tmp_path, shapes_cache):
    run_in_process(tmp_path, shapes_cache, "model=m2f_tiny", "method=lora", "method.targets=[deform_attn]",
                   "train.max_iter=10", "train.warmup_iters=0")
    (record,) = records_under(tmp_path)
    assert record["status"] == "ok"
    assert record["config"]["model.family"] == "mask2former"
    assert isinstance(record["metrics"]["segm"]["AP"], float)
    assert record["params"]["by_group"]["other"]["total"] == 0
    assert 0 < record["params"]["by_group"]["peft"]["trainable"] < record["params"]["trainable"]
