"""The method contract, for every registered method on every family's tiny preset.

What a method registers is what happens: the parameters it adds are recorded as its own
(accounted as `peft`, trained at `train.peft_lr`), the model's output at init equals the
base model's, and after real optimizer steps frozen tensors are bit-identical while every
trainable one moved. A new method or family is covered without touching this file.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from omegaconf import OmegaConf

from helpers import CONF, preset, shapes_batch, train_steps_and_check, ulps
from peftseg.config import TrainConfig
from peftseg.engine.optim import build_optimizer
from peftseg.errors import UserError
from peftseg.methods import apply_method
from peftseg.models import build_model
from peftseg.params import added_params, count_parameters, group_of
from peftseg.registry import FAMILIES, METHODS

LR = {"backbone": 1e-3, "peft": 2e-3, "neck": 3e-3, "decoder": 3e-3, "task_heads": 3e-3}
TRAIN = OmegaConf.merge(OmegaConf.structured(TrainConfig),
                        {"base_lr": LR["backbone"], "peft_lr": LR["peft"], "non_backbone_lr": LR["task_heads"]})


def tiny_presets() -> dict[str, str]:
    """family -> its CPU-sized preset (conf/model/*tiny*.yaml); every family must have one."""
    found = {}
    for path in sorted(CONF.glob("model/*tiny*.yaml")):
        m = re.search(r"/schema/model/(\w+)@_here_", path.read_text())
        if m:
            found.setdefault(m.group(1), path.stem)
    return found


PRESETS = tiny_presets()


def test_every_family_has_a_tiny_preset():
    assert set(PRESETS) == set(FAMILIES.names())


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    return shapes_batch(tmp_path_factory.mktemp("contract"), n=2)


@pytest.fixture(scope="module", params=sorted(PRESETS))
def family_base(request, batch):
    """A family's tiny model and its outputs on `batch` (every method's init is compared to them)."""
    family = request.param
    torch.manual_seed(0)
    model = build_model(preset("model", PRESETS[family], FAMILIES.get(family).config), num_classes=3).eval()
    return family, model, _outputs(model, batch)


def _outputs(model, batch):
    with torch.no_grad():
        return model([{"image": d["image"], "height": d["height"], "width": d["width"]} for d in batch])


def _same_outputs_at_init(base_outputs, model, batch, label):
    model.eval()
    for ob, om in zip(base_outputs, _outputs(model, batch)):
        a, b = ob["instances"], om["instances"]
        assert len(a) == len(b), f"{label}: {len(a)} vs {len(b)} detections at init"
        # the update adds exact zeros, but a wrapped layer may run another kernel (reduction order):
        # a few ulps per layer; scores: the logits' error relative to the score (measured <= 7 ulps)
        torch.testing.assert_close(b.scores, a.scores, atol=ulps(a.scores, 64), rtol=0)
        # boxes are in pixels of the output image: ulps of its side (their largest possible value)
        side = max(max(d["height"], d["width"]) for d in batch)
        torch.testing.assert_close(b.pred_boxes.tensor, a.pred_boxes.tensor, atol=ulps(side, 64), rtol=0)


@pytest.mark.parametrize("name", METHODS.names())
def test_method_contract(family_base, batch, name):
    family, base, base_outputs = family_base
    spec = METHODS.get(name)
    missing = [need for need in spec.requires if not getattr(base.peftseg_facts.family, need)]
    if missing:  # a family without what the method needs: a clear refusal, nothing half-applied
        with pytest.raises(UserError, match=name):
            apply_method(copy.deepcopy(base), preset("method", name, spec.config))
        return
    model = apply_method(copy.deepcopy(base), preset("method", name, spec.config))
    fmap = model.peftseg_facts.family

    # 1. ownership: what the method added is recorded, accounted as peft, nothing else is
    added = added_params(model)
    params = dict(model.named_parameters())
    assert bool(added) == spec.adds_parameters, f"{name} on {family}: added {len(added)} parameters"
    assert set(added) <= set(params)
    counts = count_parameters(model)
    assert counts.by_group["peft"]["total"] == sum(params[n].numel() for n in added)
    assert all(group_of(n, fmap, added) == "peft" for n in added)
    assert counts.total == sum(p.numel() for p in params.values())

    # 2. output at init equals the base model's (zero-initialised updates)
    if spec.adds_parameters:
        _same_outputs_at_init(base_outputs, model, batch, f"{name} on {family}")

    # 3. each trainable parameter is in the optimizer at its group's learning rate
    optimizer = build_optimizer(model, TRAIN)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    trainable = {n for n, p in params.items() if p.requires_grad}
    # `full` trains everything but what the family never trains (FamilyMap.frozen: seem's text encoder)
    trainable_at_most = {n for n in params if not n.startswith(fmap.frozen)}
    assert trainable and trainable <= trainable_at_most
    assert (name == "full") == (trainable == trainable_at_most)
    for n in trainable:
        group = group_of(n, fmap, added)
        assert lr_of[id(params[n])] == pytest.approx(LR[group]), f"{n} ({group})"
    assert all(id(params[n]) not in lr_of for n in set(params) - trainable)

    # 4. after 3 steps: frozen tensors bit-identical, every trainable one moved. GLoRA's bias scale D
    # multiplies the base bias (b0 ⊙ D), and the tiny presets' random backbones start with zero
    # biases (detectron2's ViT/Swin init), so there D has no gradient and must stay exactly as it was;
    # test_orthogonal_glora trains it on a nonzero bias
    idle = {n for n in trainable if ".glora_D." in n
            and not model.get_submodule(n.split(".glora_D.")[0]).get_base_layer().bias.any()}
    train_steps_and_check(model, batch, optimizer, trainable - idle, f"{name} on {family}")


def test_lora_on_the_conv_groups(family_base, batch):
    """LoRA on every convolution group (`*_conv`) the family's tiny preset has: every selected conv
    is wrapped, the output at init is the base model's, and real steps train only the factors."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    family, base, base_outputs = family_base
    fmap = base.peftseg_facts.family
    names = [n for n, _ in base.named_modules()]
    groups = [g for g, pattern in fmap.lora_targets.items()
              if g.endswith("_conv") and any(re.fullmatch(pattern, n) for n in names)]
    assert groups, f"{family} has no convolution group its tiny preset fills"
    spec = METHODS.get("lora")
    model = apply_method(copy.deepcopy(base), preset("method", "lora", spec.config, targets=groups,
                                                     train_task_layers=False))
    selected = {n for g in groups for n in names if re.fullmatch(fmap.lora_targets[g], n)}
    wrapped = {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    assert wrapped == selected
    _same_outputs_at_init(base_outputs, model, batch, f"conv lora on {family}")
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == set(added_params(model)) and all(".lora_" in n for n in trainable)
    train_steps_and_check(model, batch, build_optimizer(model, TRAIN), trainable, f"conv lora on {family}")
