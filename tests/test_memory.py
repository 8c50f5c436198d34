"""Memory-lean options: activation checkpointing, reduced-precision frozen base, block
selection, the side path. Numbers, not just "it runs"."""

import copy
import re

import pytest
import torch
from detectron2.utils.events import EventStorage

from helpers import preset, run_in_process, shapes_batch, ulps
from peftseg.build.activation_checkpointing import (
    checkpoint_block_names,
    disable_activation_checkpointing,
    enable_activation_checkpointing,
)
from peftseg.methods import apply_method
from peftseg.registry import METHODS


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    return shapes_batch(tmp_path_factory.mktemp("memory"), n=2)


def grads(model, batch) -> dict[str, torch.Tensor]:
    """Gradients of the summed training losses, with the RNG (drop path, RPN/ROI sampling)
    reset so two calls see the same draws."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with EventStorage():
        loss = sum(model(batch).values())
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["full", "lora", "adapter"])
def test_checkpointed_gradients_equal_the_plain_ones(base, batch, method):
    model = apply_method(copy.deepcopy(base), preset("method", method, METHODS.get(method).config))
    plain = grads(model, batch)
    names = enable_activation_checkpointing(model)
    assert names == [f"backbone.net.blocks.{i}" for i in range(4)]
    checked = grads(model, batch)
    assert plain.keys() == checked.keys() and plain
    # the backbone's own parameters get gradients under `full` only; LoRA/adapters inside
    # the blocks get them in every case (the reentrant checkpoint would give none here)
    assert any(".blocks." in n for n in checked)
    for n in plain:
        # the recomputed forward runs the same kernels; a gradient sums batch x tokens products of
        # activations, so a few-ulp change in one (other blocking) shows up to ~64 ulps of its max
        torch.testing.assert_close(checked[n], plain[n], rtol=0, atol=ulps(plain[n], 64), msg=n)
    disable_activation_checkpointing(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("model_name, targets", [("maskdino_tiny", ["deform_attn", "decoder_deform_attn"]),
                                                 ("m2f_tiny", ["deform_attn", "decoder_attn"])])
def test_query_family_layers_checkpoint_to_the_same_gradients(batch, model_name, targets):
    from peftseg.models import build_model

    torch.manual_seed(0)
    base = build_model(preset("model", model_name), num_classes=3)
    model = apply_method(base, preset("method", "lora", targets=targets))
    plain = grads(model, batch)
    names = enable_activation_checkpointing(model)
    assert any("encoder.layers" in n for n in names) and any("decoder.layers" in n for n in names)
    checked = grads(model, batch)
    assert plain.keys() == checked.keys() and any("lora_" in n for n in plain)
    for n in plain:
        # as above: the same kernels recomputed, gradients as sums over batch x tokens; 64 ulps of each
        torch.testing.assert_close(checked[n], plain[n], rtol=0, atol=ulps(plain[n], 64), msg=n)


def test_checkpointing_is_inactive_in_eval_and_survives_deepcopy(model, batch):
    enable_activation_checkpointing(model)
    copied = copy.deepcopy(model)
    block = copied.backbone.net.blocks[0]
    assert block.forward.__self__ is block  # rebound to the copy, not the original
    model.eval(), copied.eval()
    with torch.no_grad():
        a, b = model([batch[0]])[0], copied([batch[0]])[0]
    assert torch.equal(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)


def test_swin_and_mask2former_list_their_blocks():
    from peftseg.models import build_model
    from peftseg.models.mask2former import Mask2FormerConfig
    from peftseg.models.swin import SwinConfig

    swin = build_model(preset("model", "swin_tiny", SwinConfig), num_classes=3)
    names = checkpoint_block_names(swin)
    cfg = preset("model", "swin_tiny", SwinConfig)
    assert len(names) == sum(cfg.depths) and all(".blocks." in n for n in names)
    m2f_cfg = preset("model", "m2f_tiny", Mask2FormerConfig)
    m2f = build_model(m2f_cfg, num_classes=3)
    names = checkpoint_block_names(m2f)
    # Swin blocks + deformable encoder layers + masked-attention decoder layers
    # (transformers counts the query prediction as a layer, so decoder_layers - 1 modules)
    assert len(names) == sum(m2f_cfg.depths) + m2f_cfg.encoder_layers + m2f_cfg.decoder_layers - 1


# ---- method.base_dtype --------------------------------------------------------------

def features(model, batch, autocast=False):
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return {k: v.float() for k, v in model.backbone(model.preprocess_image(batch).tensor).items()}


def test_bf16_base_halves_frozen_bytes_keeps_trainables_fp32_and_drifts_little(base, batch):
    cfg = preset("method", "lora", METHODS.get("lora").config)
    ref = apply_method(copy.deepcopy(base), cfg)
    low = apply_method(copy.deepcopy(base), preset("method", "lora", METHODS.get("lora").config, base_dtype="bf16"))
    frozen = [(n, p) for n, p in low.named_parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for _, p in frozen)
    assert all(p.dtype == torch.float32 for p in low.parameters() if p.requires_grad)
    bytes_ref = sum(p.numel() * p.element_size() for p in ref.parameters() if not p.requires_grad)
    bytes_low = sum(p.numel() * p.element_size() for _, p in frozen)
    assert bytes_low * 2 == bytes_ref
    a, b = features(ref, batch), features(low, batch, autocast=True)
    for k in a:
        # genuinely lossy: bf16 weights and autocast activations round to bf16's eps (2^-7, 0.8 %),
        # a few roundings deep that mostly cancel; measured 1-1.5 eps of the feature's max: 4 eps
        drift = (a[k] - b[k]).abs().max().item()
        assert drift <= ulps(a[k], 4, torch.bfloat16), (k, drift / a[k].abs().max().item())


def test_merging_a_bf16_base_run_writes_float32_with_the_update_added_in_float32(base):
    from peftseg.checkpoint.merge import merge_and_unload

    model = apply_method(copy.deepcopy(base), preset("method", "lora", METHODS.get("lora").config, base_dtype="bf16"))
    qkv = model.backbone.net.blocks[0].attn.qkv
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a small update, as training leaves one: far below bf16's step
        qkv.lora_A["default"].weight.copy_(torch.randn(qkv.lora_A["default"].weight.shape, generator=g))
        qkv.lora_B["default"].weight.copy_(1e-6 * torch.randn(qkv.lora_B["default"].weight.shape, generator=g))
    frozen = qkv.base_layer.weight.detach().float()
    delta = qkv.get_delta_weight("default").detach().float()
    merged = merge_and_unload(model)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert merged.peftseg_facts.base_dtype == "fp32"  # stored as float32 again
    w = merged.backbone.net.blocks[0].attn.qkv.weight
    # one float32 addition both ways, rounded to within an ulp of w; the update (~1e-6) is ~100x that
    # ulp, so one lost to bf16 rounding would fail: 2 ulps of w
    assert torch.allclose(w, frozen + delta, atol=ulps(w, 2), rtol=0)
    # in bf16 most of this update would have rounded away
    assert (w.bfloat16().float() == frozen).float().mean() > 0.5


def test_bf16_base_is_refused_for_full_and_bad_values_name_the_fix():
    from peftseg.errors import UserError
    from peftseg.methods.options import MemoryOptions, check_base_dtype

    with pytest.raises(UserError, match="nothing frozen"):
        check_base_dtype("bf16", "full")
    with pytest.raises(UserError, match=r"choose one of \['fp32', 'bf16'\]"):
        MemoryOptions(base_dtype="fp16")


# ---- method.blocks --------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [("all", [0, 1, 2, 3]), ("last:2", [2, 3]), ("first:1", [0]),
                                            ([3, 1], [1, 3])])
def test_blocks_select_which_blocks_get_lora_and_adapters(base, spec, expected):
    for method, marker in (("lora", ".lora_A."), ("adapter", ".peft_adapters.")):
        cfg = preset("method", method, METHODS.get(method).config, blocks=spec)
        model = apply_method(copy.deepcopy(base), cfg)
        got = sorted({int(n.split(".")[3]) for n, _ in model.named_parameters() if marker in n})
        assert got == expected, (method, spec, got)


def test_lora_last_blocks_count_closed_form(base):
    # qkv (96 -> 288) and proj (96 -> 96), rank 8: r·(in + out) each
    cfg = preset("method", "lora", METHODS.get("lora").config, blocks="last:2")
    model = apply_method(copy.deepcopy(base), cfg)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora == 2 * (8 * (96 + 288) + 8 * (96 + 96))


@pytest.mark.parametrize("spec, fix", [("last:0", "last:N"), ("some", "last:N"), ([1, 1], "twice"),
                                       ([-1], "last:N"), ("last:9", "N ≤ 4"), ([7], "indices below 4")])
def test_bad_block_selection_is_refused_with_the_fix(base, spec, fix):
    from peftseg.errors import UserError

    cfg = preset("method", "lora", METHODS.get("lora").config, blocks=spec) if not isinstance(spec, list) or \
        spec[0] >= 0 else None
    with pytest.raises(UserError, match=re.escape(fix)):
        if cfg is None:
            from peftseg.methods.options import parse_blocks

            parse_blocks(spec)
        apply_method(copy.deepcopy(base), cfg)


def test_blocks_refused_for_a_method_that_places_nothing(base):
    from peftseg.errors import UserError

    with pytest.raises(UserError, match="inserts none"):
        apply_method(copy.deepcopy(base), preset("method", "heads", METHODS.get("heads").config, blocks="last:2"))


# ---- method=side ----------------------------------------------------------------------

def test_side_equals_base_at_init_counts_closed_form_and_keeps_backbone_graphless(base, batch):
    from peftseg.methods._side_path import side_parameter_count, side_plan
    from peftseg.params import added_params, count_parameters

    cfg = preset("method", "side", METHODS.get("side").config, blocks="last:3", bottleneck=16)
    model = apply_method(copy.deepcopy(base), cfg)
    a, b = features(base, batch), features(model, batch)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # vitdet_tiny: d = 96, 3 blocks feed last_feat: 3·(96·16 + 16) + (16·96 + 96)
    _, _, feeds = side_plan(model, cfg)
    expected = 3 * (96 * 16 + 16) + (16 * 96 + 96)
    assert side_parameter_count(feeds, 16) == expected
    side = [p for n, p in model.named_parameters() if ".peft_side." in n]
    assert sum(p.numel() for p in side) == expected
    assert set(added_params(model)) == {n for n, _ in model.named_parameters() if ".peft_side." in n}
    assert count_parameters(model).by_group["peft"]["trainable"] == expected
    # one training forward: the backbone's own output carries no graph, the side path's does
    model.train()
    seen = {}
    hook = model.backbone.net.blocks[3].register_forward_hook(lambda m, i, o: seen.update(out=o))
    torch.manual_seed(0)
    with EventStorage():
        loss = sum(model(batch).values())
    hook.remove()
    assert not seen["out"].requires_grad
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("backbone.net.blocks."))
    assert all(p.grad is not None for p in side)


def test_side_on_swin_feeds_every_stage(tmp_path):
    from peftseg.methods._side_path import side_plan
    from peftseg.models import build_model
    from peftseg.models.swin import SwinConfig

    torch.manual_seed(0)
    swin = build_model(preset("model", "swin_tiny", SwinConfig), num_classes=3)
    cfg = preset("method", "side", METHODS.get("side").config, bottleneck=8)
    ref = copy.deepcopy(swin).eval()
    model = apply_method(swin, cfg)
    _, _, feeds = side_plan(model, cfg)
    assert list(feeds) == ["p0", "p1", "p2", "p3"]
    imgs = shapes_batch(tmp_path, n=1)
    a, b = features(ref, imgs), features(model, imgs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_side_on_mask2former_feeds_the_backbone_output_maps(tmp_path):
    import dataclasses

    from peftseg.errors import UserError
    from peftseg.methods._side_path import side_plan
    from peftseg.models import build_model
    from peftseg.models.mask2former import Mask2FormerConfig

    torch.manual_seed(0)
    m2f = build_model(preset("model", "m2f_tiny", Mask2FormerConfig), num_classes=3).eval()
    ref = copy.deepcopy(m2f)
    cfg = preset("method", "side", METHODS.get("side").config, bottleneck=8)
    model = apply_method(m2f, cfg)
    _, _, feeds = side_plan(model, cfg)
    assert list(feeds) == [f"feature_maps.{i}" for i in range(4)]
    x = torch.randn(1, 3, 128, 128)
    enc = "m2f.model.pixel_level_module.encoder"
    with torch.no_grad():
        a, b = ref.get_submodule(enc)(x).feature_maps, model.get_submodule(enc)(x).feature_maps
    assert len(a) == len(b) == 4 and all(torch.equal(u, v) for u, v in zip(a, b))
    # a family that names no side path is refused with the fix
    model.peftseg_facts.family = dataclasses.replace(model.peftseg_facts.family, side_body="", side_features={})
    with pytest.raises(UserError, match="side_body"):
        side_plan(model, cfg)


# ---- train.amp ------------------------------------------------------------------------

def test_precision_follows_amp_and_base_dtype():
    from omegaconf import OmegaConf

    from peftseg.engine.precision import CpuAMPTrainer, make_trainer, run_precision
    from peftseg.models.family import ModelFacts
    from peftseg.errors import UserError

    cpu = torch.device("cpu")
    plain, bf16_base = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    bf16_base.peftseg_facts = ModelFacts(family=None, base_dtype="bf16")
    t = lambda **kw: OmegaConf.create({"amp": False, "amp_dtype": "bf16", **kw})  # noqa: E731
    assert run_precision(t(), cpu, plain) == "fp32"
    assert run_precision(t(amp=True), cpu, plain) == "amp_bf16"
    assert run_precision(t(), cpu, bf16_base) == "amp_bf16"  # a bf16 base runs only under autocast
    with pytest.raises(UserError, match="needs a CUDA device"):
        run_precision(t(amp=True, amp_dtype="fp16"), cpu, plain)
    with pytest.raises(UserError, match="not one of the choices: bf16, fp16"):
        run_precision(t(amp=True, amp_dtype="fp8"), cpu, plain)
    trainer = make_trainer(plain, [], torch.optim.SGD(plain.parameters(), lr=0.1), "amp_bf16", cpu)
    assert isinstance(trainer, CpuAMPTrainer) and trainer.precision == torch.bfloat16


# ---- smoke runs: every new option end to end (ok record, AP > 0) ------------------------

@pytest.mark.parametrize("overrides, expect", [
    # two runs cover every option; bf16 compute sits on the side path, whose backward stays
    # out of the backbone (LoRA under CPU bf16 autocast took ~160 s here, side ~45 s)
    (["method=lora", "train.activation_checkpointing=true"],
     {"precision": "fp32", "base_dtype": "fp32", "checkpointed_blocks": 4}),
    (["method=side", "method.base_dtype=bf16", "method.blocks=last:2", "train.amp=true"],
     {"precision": "amp_bf16", "base_dtype": "bf16", "checkpointed_blocks": 0}),
])
def test_smoke_run_of_each_memory_option(tmp_path, shapes_cache, overrides, expect):
    record = run_in_process(tmp_path, shapes_cache, *overrides)
    assert record.ok
    assert record.mask_ap > 0 and record.box_ap > 0
    for key, value in expect.items():
        assert record.eff(key) == value, key
