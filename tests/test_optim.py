"""Optimizer parameter groups: per-group learning rates, no decay on biases and norms."""

import copy

import pytest
import torch.nn as nn
from omegaconf import OmegaConf

from peftseg.config import TrainConfig
from peftseg.registry import METHODS
from peftseg.engine.optim import build_optimizer
from peftseg.errors import UserError
from peftseg.methods import apply_method
from helpers import preset


def train_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), kw)


def hyper_of(optimizer):
    return {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def test_peft_and_heads_get_their_own_learning_rates(base):
    model = apply_method(copy.deepcopy(base), preset("method", "lora", METHODS.get("lora").config))
    opt = build_optimizer(model, train_cfg(base_lr=1e-5, peft_lr=1e-3, non_backbone_lr=1e-4, weight_decay=0.05))
    hyper = hyper_of(opt)
    norms = {id(p) for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))
             or type(m).__name__ == "LayerNorm" for p in m.parameters(recurse=False)}
    seen = {"peft": 0, "heads": 0}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in hyper, f"frozen {name} is in the optimizer"
            continue
        lr, wd = hyper[id(p)]
        group = "peft" if "lora_" in name else "heads"  # lora leaves only these two trainable
        seen[group] += 1
        assert lr == pytest.approx(1e-3 if group == "peft" else 1e-4), name
        no_decay = name.endswith(".bias") or id(p) in norms
        assert wd == (0.0 if no_decay else 0.05), name
    assert seen["peft"] and seen["heads"]
    assert any(wd == 0.0 for _, wd in hyper.values()) and any(wd == 0.05 for _, wd in hyper.values())


def test_unset_group_rates_fall_back_to_base_lr(base):
    model = apply_method(copy.deepcopy(base), preset("method", "full", METHODS.get("full").config))
    opt = build_optimizer(model, train_cfg(base_lr=2e-4))
    assert {g["lr"] for g in opt.param_groups} == {2e-4}


def test_group_rates_survive_the_lr_schedule(base):
    from peftseg.engine.optim import build_lr_scheduler
    model = apply_method(copy.deepcopy(base), preset("method", "lora", METHODS.get("lora").config))
    cfg = train_cfg(base_lr=1e-4, peft_lr=1e-3, max_iter=10, warmup_iters=0)
    opt = build_optimizer(model, cfg)
    sched = build_lr_scheduler(opt, cfg)
    opt.step()
    sched.step()
    rates = sorted({round(g["lr"] / g["initial_lr"], 12) for g in opt.param_groups})
    assert len(rates) == 1  # every group decays by the same factor, keeping the 10x ratio
    assert {round(g["initial_lr"], 12) for g in opt.param_groups} == {1e-4, 1e-3}


@pytest.mark.parametrize("key", ["peft_lr", "non_backbone_lr", "base_lr"])
def test_non_positive_rates_are_refused(key):
    with pytest.raises(UserError, match=rf"train\.{key} must be a number > 0 \(got 0.0\)"):
        OmegaConf.to_object(train_cfg(**{key: 0.0}))
