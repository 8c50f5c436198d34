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


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    # Only trainable parameters; norms and biases carry no weight decay.
    params = get_default_optimizer_params(
        model, base_lr=cfg.base_lr, weight_decay=cfg.weight_decay,
        weight_decay_norm=0.0, weight_decay_bias=0.0,
    )
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
