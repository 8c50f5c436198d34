"""Optimizer and LR schedule, built from detectron2/fvcore parts."""

from __future__ import annotations

import torch
from detectron2.solver import LRMultiplier
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import (
    CosineParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
)
from detectron2.solver.lr_scheduler import WarmupParamScheduler

from peftseg.errors import UserError
from peftseg.params import group_of


def _lr_factor(model: torch.nn.Module, cfg):
    """Per-parameter LR multiplier: PEFT modules and neck+heads may get their own LR (the
    reference study trained PEFT parameters at 1e-3 but decoder-only runs at 1e-4)."""
    family = getattr(model, "peftseg_family", None)
    group_lr = {"peft": cfg.peft_lr, "neck": cfg.heads_lr, "heads": cfg.heads_lr}
    for key, lr in (("peft_lr", cfg.peft_lr), ("heads_lr", cfg.heads_lr)):
        if lr is not None and not lr > 0:
            raise UserError(f"train.{key}={lr} must be greater than 0, or null to use train.base_lr.")

    def factor(name: str) -> float:
        lr = group_lr.get(group_of(name, family))
        return 1.0 if lr is None else lr / cfg.base_lr

    return factor


def _no_decay_on_norms(model: torch.nn.Module, groups: list[dict]) -> list[dict]:
    """detectron2's norm list misses its own channels-first LayerNorm (ViTDet's neck and
    heads use it), so those weights would be decayed; split them into no-decay groups."""
    norm_ids = {
        id(p) for m in model.modules() if "norm" in type(m).__name__.lower()
        for p in m.parameters(recurse=False)
    }
    out = []
    for g in groups:
        decayed = [p for p in g["params"] if id(p) not in norm_ids]
        if g.get("weight_decay", 0.0) == 0.0 or len(decayed) == len(g["params"]):
            out.append(g)
            continue
        if decayed:
            out.append({**g, "params": decayed})
        out.append({**g, "params": [p for p in g["params"] if id(p) in norm_ids], "weight_decay": 0.0})
    return out


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    if not cfg.base_lr > 0:
        raise UserError(f"train.base_lr={cfg.base_lr} must be greater than 0, e.g. train.base_lr=1e-3.")
    # Only trainable parameters; norms and biases carry no weight decay.
    params = get_default_optimizer_params(
        model, base_lr=cfg.base_lr, weight_decay=cfg.weight_decay,
        weight_decay_norm=0.0, weight_decay_bias=0.0, lr_factor_func=_lr_factor(model, cfg),
    )
    params = _no_decay_on_norms(model, params)
    if not params:
        raise UserError(
            "The method left no trainable parameter, so there is nothing to optimise. "
            "Pick a method that trains something (e.g. method=lora, method=heads) or enable "
            "method.train_heads=true."
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.base_lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.base_lr, momentum=cfg.momentum)
    raise UserError(f"Unknown train.optimizer={cfg.optimizer!r}; use train.optimizer=adamw or train.optimizer=sgd.")


def _multiplier(cfg) -> ParamScheduler:
    if cfg.lr_schedule == "cosine":
        return CosineParamScheduler(1.0, 0.0)
    if cfg.lr_schedule == "step":
        steps = [int(f * cfg.max_iter) for f in cfg.lr_steps]
        return MultiStepParamScheduler(
            [0.1**i for i in range(len(steps) + 1)], milestones=steps, num_updates=cfg.max_iter
        )
    raise UserError(f"Unknown train.lr_schedule={cfg.lr_schedule!r}; use train.lr_schedule=cosine or step.")


def build_lr_scheduler(optimizer, cfg):
    warmup = min(cfg.warmup_iters / max(cfg.max_iter, 1), 1.0)
    sched = WarmupParamScheduler(_multiplier(cfg), cfg.warmup_factor, warmup)
    return LRMultiplier(optimizer, multiplier=sched, max_iter=cfg.max_iter)
