"""LoRA's initialisations (method.init), per-group ranks (method.rank_pattern/alpha_pattern) and
the LoRA+ / LoRA-FA optimisers, on vitdet_tiny: each start is checked against what its method
defines, a residual-based start against its checkpoint loaded on the untouched base."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from helpers import shapes_batch
from peftseg.errors import UserError
from peftseg.methods import apply_method
from peftseg.methods.lora import LoraConfig
from peftseg.models import facts_of

LAYER = "backbone.net.blocks.0.attn.qkv"  # a LoRA target every test below checks


def _lora(base, **kw):
    model = copy.deepcopy(base)
    return apply_method(model, LoraConfig(**{"targets": ["attn_qkv"], **kw}))


def _factors(model, layer=LAYER):
    mod = model.get_submodule(layer)
    return (mod.lora_A["default"].weight.detach(), mod.lora_B["default"].weight.detach(),
            mod.scaling["default"], mod.get_base_layer().weight.detach())


def _original(base, layer=LAYER):
    return base.get_submodule(layer).weight.detach()


def test_default_and_gaussian_start_with_b_zero_and_leave_the_base(base):
    a, b, _, w = _factors(_lora(base, init="default"))
    assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a) == a.numel()
    # Kaiming-uniform with a=sqrt(5): |A| <= 1/sqrt(fan_in)
    assert a.abs().max() <= 1 / a.shape[1] ** 0.5
    assert torch.equal(w, _original(base))
    rank = 8
    a, b, _, w = _factors(_lora(base, init="gaussian", rank=rank))
    assert torch.count_nonzero(b) == 0
    assert abs(a.mean().item()) < 0.3 / rank and a.std().item() == pytest.approx(1 / rank, rel=0.2)  # N(0, 1/r)
    assert torch.equal(w, _original(base))


def test_pissa_factors_are_the_top_singular_part_and_the_base_keeps_the_rest(base):
    rank = 4
    a, b, s, w_res = _factors(_lora(base, init="pissa", rank=rank, alpha=8.0))
    w = _original(base)
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    top = u[:, :rank] @ torch.diag(sv[:rank]) @ vh[:rank]
    assert torch.allclose(s * b @ a, top, atol=1e-5)
    assert torch.allclose(w_res + s * b @ a, w, atol=1e-5)
    assert torch.allclose(w_res, w - top, atol=1e-5)


def test_olora_factors_are_the_qr_of_the_weight(base):
    rank = 4
    a, b, s, w_res = _factors(_lora(base, init="olora", rank=rank))
    w = _original(base)
    q, r = torch.linalg.qr(w)
    assert torch.allclose(b, q[:, :rank], atol=1e-5) and torch.allclose(a, r[:rank], atol=1e-5)
    assert torch.allclose(b.T @ b, torch.eye(rank), atol=1e-5)  # orthonormal columns of B
    assert torch.allclose(w_res + s * b @ a, w, atol=1e-5)


def test_orthogonal_start_has_both_factors_nonzero_and_a_zero_update(base):
    a, b, s, w = _factors(_lora(base, init="orthogonal", rank=8))
    # peft builds A from the odd and B from the even rows of one orthogonal matrix: B·A = 0
    assert torch.count_nonzero(a) == a.numel() and torch.count_nonzero(b) == b.numel()
    assert (b @ a).abs().max() < 1e-6 * b.abs().max() * a.abs().max() * a.shape[0] + 1e-7
    assert torch.equal(w, _original(base))


def _batches(tmp_path, n_images=2):
    batch = shapes_batch(tmp_path, n=n_images, image_size=128)
    drawn = []

    def calibration():
        def loader():  # as the run's train loader: endless; counts what was drawn
            while True:
                drawn.append(1)
                yield batch
        return loader()
    return batch, drawn, calibration


def _layer_inputs(model, batch, layer=LAYER):
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, args, out: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            model.eval()(batch)
    finally:
        handle.remove()
    return torch.cat(seen)


def test_eva_reads_the_train_batches_and_starts_a_at_their_principal_directions(base, tmp_path):
    batch, drawn, calibration = _batches(tmp_path)
    model = copy.deepcopy(base)
    facts_of(model).calibration = calibration
    model = apply_method(model, LoraConfig(targets=["attn_qkv"], blocks=[0], init="eva", rank=4, init_batches=1))
    assert drawn, "eva drew no batch from the train loader"
    assert len(drawn) == 1  # init_batches=1
    a, b, _, w = _factors(model)
    assert torch.count_nonzero(b) == 0 and torch.equal(w, _original(base))
    # EVA: A's rows are the top principal directions of the layer's inputs (peft's incremental PCA)
    x = _layer_inputs(base, batch)
    _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    cos = (torch.nn.functional.normalize(a, dim=1) * vh[:4]).sum(1).abs()
    assert cos.min() > 0.99, cos
    assert facts_of(model).init_seconds > 0


def test_corda_reads_the_train_batches_and_keeps_the_weight_as_residual_plus_update(base, tmp_path):
    batch, drawn, calibration = _batches(tmp_path)
    model = copy.deepcopy(base)
    facts_of(model).calibration = calibration
    model = apply_method(model, LoraConfig(targets=["attn_qkv"], blocks=[0], init="corda", rank=4, init_batches=1))
    assert len(drawn) == 1
    a, b, s, w_res = _factors(model)
    w = _original(base)
    assert torch.allclose(w_res + s * b @ a, w, atol=1e-4)
    # data-aware: the update is not PiSSA's (the top singular part of W alone)
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    assert not torch.allclose(s * b @ a, u[:, :4] @ torch.diag(sv[:4]) @ vh[:4], atol=1e-3)


def test_data_driven_start_without_the_train_loader_is_refused(base):
    with pytest.raises(UserError, match=r"method.init=eva starts LoRA from the activations of training batches"):
        _lora(base, init="eva")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_start_saves_a_plain_lora_that_loads_on_the_untouched_base(init, tmp_path):
    from detectron2.utils.events import EventStorage

    from peftseg.build import build_for_run
    from peftseg.checkpoint.files import FINAL, PeftCheckpointer
    from peftseg.checkpoint.load import load_model
    from peftseg.checkpoint.merge import merge_and_unload
    from peftseg.config import compose_config

    classes = ["circle", "square", "triangle"]
    cfg = compose_config(["model=vitdet_tiny", "train=smoke", "method=lora", f"method.init={init}", "method.rank=4",
                          "method.rank_pattern={attn_proj: 2}"])
    model = build_for_run(cfg, len(classes), classes)
    batch = shapes_batch(tmp_path / "data", n=2, image_size=128)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    with EventStorage():
        for _ in range(2):  # a few real steps: the factors leave their start
            loss = sum(model(batch).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
    run = tmp_path / "run"
    run.mkdir()
    meta = {"config": OmegaConf.to_container(cfg, resolve=True), "class_names": classes}
    PeftCheckpointer(model, save_dir=str(run), meta=meta).save(FINAL)

    loaded = load_model(str(run), [])  # a fresh build of the untouched base, a plain LoRA loaded on it
    assert loaded.cfg.method.init == "default" and loaded.cfg.method.rank == 8
    assert dict(loaded.cfg.method.rank_pattern) == {"attn_proj": 4}
    assert loaded.model.get_submodule(LAYER).lora_A["default"].weight.shape[0] == 8
    images = torch.stack([d["image"].float() for d in batch])
    with torch.no_grad():
        want = model.eval().backbone((images - model.pixel_mean) / model.pixel_std)
        got = loaded.model.backbone((images - model.pixel_mean) / model.pixel_std)
        err = max((want[k] - got[k]).abs().max().item() for k in want)
        assert err < 1e-4, err
        merged = merge_and_unload(loaded.model)
        folded = merged.backbone((images - model.pixel_mean) / model.pixel_std)
        assert max((want[k] - folded[k]).abs().max().item() for k in want) < 1e-4
    # peft's own layout too: a plain LoRA of rank 2r
    import json

    peft_cfg = json.loads((run / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["r"] == 8 and peft_cfg["init_lora_weights"] is True and peft_cfg["lora_alpha"] == 16.0


def test_rank_and_alpha_patterns_set_each_groups_rank_in_the_parameter_counts(base):
    from peftseg.params import count_parameters

    targets = ["attn_qkv", "mlp"]
    plain = _lora(base, rank=4, targets=targets)
    patterned = _lora(base, rank=4, targets=targets, rank_pattern={"mlp": 12}, alpha_pattern={"mlp": 24.0})
    mlp = [n for n, m in patterned.named_modules() if n.endswith("mlp.fc1") or n.endswith("mlp.fc2")]
    mlp = [n for n in mlp if hasattr(patterned.get_submodule(n), "lora_A")]
    assert mlp
    # closed form: rank r costs r·(in + out) per layer; mlp layers go from 4 to 12
    extra = sum(8 * (m.in_features + m.out_features) for m in (base.get_submodule(n) for n in mlp))
    assert count_parameters(patterned).by_group["peft"]["trainable"] == \
        count_parameters(plain).by_group["peft"]["trainable"] + extra
    layer = patterned.get_submodule(mlp[0])
    assert layer.r["default"] == 12 and layer.scaling["default"] == 2.0
    assert patterned.get_submodule(LAYER).r["default"] == 4 and patterned.get_submodule(LAYER).scaling["default"] == 2.0


@pytest.mark.parametrize("pattern, message", [
    ({"decoder": 4}, r"method.rank_pattern key 'decoder' matches none of the modules this LoRA targets"),
    ({"mlp": 0}, r"method.rank_pattern.mlp must be an integer at least 1"),
])
def test_bad_rank_patterns_are_refused(base, pattern, message):
    with pytest.raises(UserError, match=message):
        _lora(base, rank_pattern=pattern)


@pytest.mark.parametrize("kw, message", [
    ({"init": "svd"}, r"method.init"),
    ({"init": "orthogonal", "rank": 5}, r"every rank must be even"),
    ({"init": "pissa", "use_dora": True}, r"method.init=pissa with method.use_dora=true is not supported"),
    ({"init": "olora", "base_dtype": "bf16"}, r"method.init=olora with method.base_dtype=bf16 is not supported"),
    ({"init_batches": 0}, r"method.init_batches"),
])
def test_bad_init_settings_are_refused(kw, message):
    with pytest.raises(UserError, match=message):
        LoraConfig(**kw)


def test_non_linear_targets_refuse_weight_based_starts():
    import torch.nn as nn

    from peftseg.methods._lora_init import check_layers

    holder = nn.Module()
    holder.attn = nn.MultiheadAttention(8, 2)
    holder.conv = nn.Conv2d(8, 8, 3)
    with pytest.raises(UserError, match=r"method.init=pissa .* nn.Linear targets only.*MultiheadAttention layers \(attn"):
        check_layers(holder, ["attn"], "pissa", "method.init")
    with pytest.raises(UserError, match=r"method.init=eva .* nn.Linear targets only.*Conv2d layers \(conv, 1 non-Linear"):
        check_layers(holder, ["conv"], "eva", "method.init")
    check_layers(holder, ["attn", "conv"], "gaussian", "method.init")  # peft draws these without the weight


def _train_cfg(**kw):
    from peftseg.config import TrainConfig

    return OmegaConf.merge(OmegaConf.structured(TrainConfig), kw)


def test_loraplus_gives_b_ratio_times_the_lr_of_a(base):
    from peftseg.engine.optim import build_optimizer

    model = _lora(base)
    opt = build_optimizer(model, _train_cfg(optimizer="loraplus", base_lr=1e-4, peft_lr=1e-3, loraplus_lr_ratio=16.0,
                                            non_backbone_lr=2e-4))
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    a_lrs = [lr[id(p)] for n, p in names.items() if "lora_A" in n]
    b_lrs = [lr[id(p)] for n, p in names.items() if "lora_B" in n]
    assert a_lrs and a_lrs == pytest.approx([1e-3] * len(a_lrs))
    assert b_lrs and b_lrs == pytest.approx([16e-3] * len(b_lrs))
    heads = [lr[id(p)] for n, p in names.items() if p.requires_grad and "lora_" not in n]
    assert heads == pytest.approx([2e-4] * len(heads))  # the task layers keep train.non_backbone_lr


def test_lorafa_freezes_a_and_trains_b(tmp_path):
    from detectron2.utils.events import EventStorage

    from peftseg.build import build_for_run
    from peftseg.config import compose_config
    from peftseg.engine.optim import build_optimizer
    from peftseg.params import count_parameters

    cfg = compose_config(["model=vitdet_tiny", "train=smoke", "method=lora", "method.targets=[attn_qkv]"])
    plain = build_for_run(cfg, 3, ["a", "b", "c"])
    cfg.train.optimizer = "lorafa"
    model = build_for_run(cfg, 3, ["a", "b", "c"])
    a_numel = sum(p.numel() for n, p in model.named_parameters() if "lora_A" in n)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    assert count_parameters(model).trainable == count_parameters(plain).trainable - a_numel
    opt = build_optimizer(model, cfg.train)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    batch = shapes_batch(tmp_path, n=2, image_size=128)
    model.train()
    with EventStorage():
        for _ in range(2):
            loss = sum(model(batch).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
    for n, p in model.named_parameters():
        if "lora_A" in n:
            assert torch.equal(p, before[n]), n
        elif "lora_B" in n:
            assert not torch.equal(p, before[n]), n
    # its frozen A is saved with the checkpoint, and the base fingerprint leaves it out
    from peftseg.checkpoint.files import base_fingerprint, trainable_state

    assert any("lora_A" in k for k in trainable_state(model))
    assert base_fingerprint(model) == base_fingerprint(plain)


@pytest.mark.parametrize("optimizer", ["loraplus", "lorafa"])
def test_lora_optimisers_refuse_a_method_without_lora(base, optimizer):
    from peftseg.engine.optim import build_optimizer
    from peftseg.methods.heads import HeadsConfig

    model = apply_method(copy.deepcopy(base), HeadsConfig())
    with pytest.raises(UserError, match=rf"train.optimizer={optimizer} treats LoRA's A and B factors differently.*"
                                        "use train.optimizer=adamw"):
        build_optimizer(model, _train_cfg(optimizer=optimizer))


def test_a_run_feeds_eva_and_corda_its_own_train_loader(base, tmp_path, shapes_cache, monkeypatch):
    from peftseg.config import compose_config
    from peftseg.data import register_splits
    from peftseg.engine.run import calibration_batches

    monkeypatch.setenv("PEFTSEG_CACHE", str(shapes_cache))
    cfg = compose_config(["model=vitdet_tiny", "train=smoke", "method=lora", "method.init=eva",
                          "dataset.num_train=8", "dataset.num_val=4"])
    splits = register_splits(cfg.dataset)
    batches = calibration_batches(splits, cfg)
    batch = next(iter(batches(base)))
    # a training batch as the trainer gets it: train.ims_per_batch mapped dicts with instances
    assert len(batch) == cfg.train.ims_per_batch and all("instances" in d and "image" in d for d in batch)
    cfg.method.init = "pissa"  # computed from the weights alone: no batches drawn
    assert calibration_batches(splits, cfg) is None
