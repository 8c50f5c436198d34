"""Optimizer and LR schedule, built from detectron2/fvcore parts."""

from __future__ import annotations

import torch
from detectron2.solver import LRMultiplier
from detectron2.solver.build import _generate_optimizer_class_with_gradient_clipping, get_default_optimizer_params
from fvcore.common.param_scheduler import (
    CosineParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
)
from detectron2.solver.lr_scheduler import WarmupParamScheduler

from peftseg.errors import UserError
from peftseg.models import facts_of
from peftseg.params import added_params, group_of


def _lr_factor(model: torch.nn.Module, cfg):
    """Per-parameter LR multiplier: PEFT modules, and everything after the backbone (neck,
    decoder, task heads), may get their own LR (the reference study trained PEFT parameters
    at 1e-3 but decoder-only runs at 1e-4)."""
    facts = facts_of(model)
    family = facts.family if facts is not None else None
    added = added_params(model)
    group_lr = {"peft": cfg.peft_lr, **{g: cfg.non_backbone_lr for g in ("neck", "decoder", "task_heads")}}

    def factor(name: str) -> float:
        lr = group_lr.get(group_of(name, family, added))
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


def clip_norm_of(cfg) -> float:
    """The global gradient-norm clip a run uses: train.clip_grad_norm, or when that is null
    the model preset's recipe value (model.clip_grad_norm)."""
    value = cfg.train.clip_grad_norm
    return float(cfg.model.clip_grad_norm if value is None else value)


def build_optimizer(model: torch.nn.Module, cfg, clip_grad_norm: float = 0.0) -> torch.optim.Optimizer:
    """`cfg` is the train config (ranges and choices were checked at compose time)."""
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
            "method.train_task_layers=true."
        )
    if cfg.optimizer in ("loraplus", "lorafa"):
        cls, kwargs, params = _lora_optimizer(model, cfg, params)
    else:
        cls, kwargs = {
            "adamw": (torch.optim.AdamW, {}),
            "sgd": (torch.optim.SGD, {"momentum": cfg.momentum}),
        }[cfg.optimizer]
    if clip_grad_norm > 0:
        # detectron2's clipped-optimizer class with a global clipper: one norm over every
        # trainable parameter (DETR/Mask2Former's "full_model" clipping), checked each step
        def clip(all_params):
            torch.nn.utils.clip_grad_norm_([p for p in all_params if p.grad is not None], clip_grad_norm)

        cls = _generate_optimizer_class_with_gradient_clipping(cls, global_clipper=clip)
    return cls(params, lr=cfg.base_lr, **kwargs)


def _lora_optimizer(model: torch.nn.Module, cfg, params: list[dict]):
    """LoRA+ (B's LR = train.loraplus_lr_ratio x A's) or LoRA-FA (A frozen, B's gradient
    projected), on peftseg's parameter groups: the per-group LRs (train.peft_lr,
    train.non_backbone_lr) and the no-decay norms stay as for adamw; only LoRA's factors change."""
    from peftseg.methods._lora_factors import lora_pairs

    pairs = lora_pairs(model)
    if not pairs:
        raise UserError(
            f"train.optimizer={cfg.optimizer} treats LoRA's A and B factors differently, but this model has no "
            "LoRA layers (its method adds none); use train.optimizer=adamw with this method, or train a LoRA "
            "method (method=lora or method=adapter_lora) with it."
        )
    if cfg.optimizer == "loraplus":
        return torch.optim.AdamW, {}, _loraplus_groups(model, params, pairs, cfg.loraplus_lr_ratio)
    dora = [p.layer for p in pairs if p.dora]
    if dora:
        raise UserError(
            f"train.optimizer=lorafa pairs each LoRA A with its B, and DoRA's magnitude vector ({dora[0]}) has no "
            "place in that pairing (peft's LoRA-FA supports plain LoRA); set method.use_dora=false, or use "
            "train.optimizer=adamw (or loraplus) with DoRA."
        )
    return _lorafa_class(), {}, _lorafa_groups(model, params, pairs)


def _loraplus_groups(model: torch.nn.Module, params: list[dict], pairs, ratio: float) -> list[dict]:
    """Which LoRA parameters take B's LR is peft's rule (create_loraplus_optimizer: lora_B, and
    1-D LoRA parameters such as DoRA's magnitude); the helper builds its own groups for every
    trainable parameter (task heads' biases at B's LR too), so it is asked for its grouping
    only and the LoRA parameters it raises get ratio x their peftseg LR here."""
    from peft.optimizers import create_loraplus_optimizer

    def grouping(groups, **kwargs):  # stands in for the optimizer class: returns peft's groups
        return groups

    lora_ids = {id(p) for pair in pairs for p in (pair.a, pair.b)}
    for module in model.modules():  # DoRA magnitudes are LoRA parameters too
        for ad in getattr(module, "lora_magnitude_vector", {}) or {}:
            lora_ids.update(id(p) for p in module.lora_magnitude_vector[ad].parameters())
    raised = set()
    if ratio != 1.0:
        for group in create_loraplus_optimizer(model, grouping, lr=1.0, loraplus_lr_ratio=ratio):
            if group["lr"] == ratio:
                raised |= {id(p) for p in group["params"] if id(p) in lora_ids}
    out = []
    for g in params:
        up = [p for p in g["params"] if id(p) in raised]
        rest = [p for p in g["params"] if id(p) not in raised]
        if rest:
            out.append({**g, "params": rest})
        if up:
            out.append({**g, "params": up, "lr": g["lr"] * ratio})
    return out


def _lorafa_class():
    # LoRA-FA's optimizer (peft.optimizers.lorafa); its create_lorafa_optimizer needs a PeftModel
    # wrapper and puts every parameter in one group at one LR, so the groups are built here
    from peft.optimizers.lorafa import LoraFAOptimizer

    return LoraFAOptimizer


def _lorafa_groups(model: torch.nn.Module, params: list[dict], pairs) -> list[dict]:
    """peftseg's groups in LoRA-FA's form: each group lists its parameters' names and LoRA
    scaling, and each trained B comes right after its frozen A (the optimizer pairs them)."""
    names = {id(p): n for n, p in model.named_parameters()}
    a_of = {id(pair.b): pair for pair in pairs}
    out = []
    for g in params:
        ps, ns, scales = [], [], []
        for p in g["params"]:
            pair = a_of.get(id(p))
            if pair is not None:
                ps += [pair.a, pair.b]
                ns += [names[id(pair.a)], names[id(pair.b)]]
                scales += [pair.scaling, pair.scaling]
            else:
                if "lora" in names[id(p)]:  # the optimizer would take it for half of a pair
                    raise UserError(f"train.optimizer=lorafa cannot place the parameter {names[id(p)]} (a LoRA "
                                    "parameter that is not a factor); use train.optimizer=adamw or loraplus.")
                ps.append(p)
                ns.append(names[id(p)])
                scales.append(None)
        out.append({**g, "params": ps, "names": ns, "scaling_factors": scales})
    return out


def _multiplier(cfg) -> ParamScheduler:
    if cfg.lr_schedule == "cosine":
        return CosineParamScheduler(1.0, 0.0)
    steps = [int(f * cfg.max_iter) for f in cfg.lr_steps]  # lr_schedule == "step"
    return MultiStepParamScheduler(
        [0.1**i for i in range(len(steps) + 1)], milestones=steps, num_updates=cfg.max_iter
    )


def build_lr_scheduler(optimizer, cfg):
    warmup = min(cfg.warmup_iters / max(cfg.max_iter, 1), 1.0)
    sched = WarmupParamScheduler(_multiplier(cfg), cfg.warmup_factor, warmup)
    return LRMultiplier(optimizer, multiplier=sched, max_iter=cfg.max_iter)
