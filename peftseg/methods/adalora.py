"""Method `adalora`: AdaLoRA, through HF peft — SVD-shaped low-rank updates P·diag(E)·Q whose
rank budget is reallocated among the targeted layers while training.

Every targeted Linear (in → out) starts at rank `rank` with r·(in+out) + r parameters
(A: r × in, B: out × r, E: r; peft's `ranknum` is a buffer). The allocator scores each
singular value by a smoothed sensitivity |p·∂L/∂p| (`beta1`, `beta2`) and, between step `tinit`
and step total_step − `tfinal`, masks the lowest-scored ones every `delta_t` steps until the
budget left is `target_rank` × the number of layers, on a cubic schedule; the last `tfinal`
steps train with that final pattern. The tensors keep their initial size (peft masks E, it does
not shrink the layers), so parameter counts stay those at init; the ranks each layer ends
with are in the run record (`rank_budget`).

The schedule's length `total_step` is the run's `train.max_iter` (conf/method/adalora.yaml
interpolates it): the allocator runs in the training loop (peftseg.engine.rank_budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from peftseg import checks
from peftseg.errors import UserError
from peftseg.methods.lowrank import TARGET_SETS, LowRankConfig, check_alpha, check_probability
from peftseg.registry import register_method
from peftseg.search_space import Int


@dataclass
class AdaloraConfig(LowRankConfig):
    name: str = "adalora"
    rank: int = 12  # initial rank of every targeted layer (peft's init_r)
    target_rank: int = 8  # average rank per layer the budget ends at (peft's target_r)
    alpha: float = 8.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    tinit: int = 0  # steps at the full initial budget before pruning starts
    tfinal: int = 0  # last steps, trained at the final budget
    delta_t: int = 1  # steps between two budget allocations (peft's deltaT)
    beta1: float = 0.85  # smoothing of the sensitivity
    beta2: float = 0.85  # smoothing of its uncertainty
    orth_reg_weight: float = 0.5  # weight of the orthogonality penalty on P and Q added to the loss
    # the schedule's length: the run's train.max_iter (the yaml interpolates it; do not set)
    total_step: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_alpha(self.alpha)
        check_probability("method.dropout", self.dropout)
        checks.integer("method.target_rank", self.target_rank, minimum=1,
                       why="it is the average rank per layer the budget ends at, e.g. method.target_rank=4")
        if self.target_rank > self.rank:
            raise UserError(
                f"method.target_rank={self.target_rank} is above method.rank={self.rank}; AdaLoRA only prunes "
                f"ranks, so set method.target_rank at most {self.rank} (or raise method.rank)."
            )
        for key in ("tinit", "tfinal"):
            checks.integer(f"method.{key}", getattr(self, key), minimum=0, why="it is a number of training steps")
        checks.integer("method.delta_t", self.delta_t, minimum=1, why="it is the number of steps between allocations")
        for key in ("beta1", "beta2"):
            checks.number(f"method.{key}", getattr(self, key), low=0, high=1, low_open=True, high_open=True,
                          why="it is an exponential-moving-average factor; AdaLoRA uses 0.85")
        checks.number("method.orth_reg_weight", self.orth_reg_weight, low=0, why="0 turns the penalty off")
        if self.total_step is not None:
            check_schedule(self)


def check_schedule(cfg: AdaloraConfig) -> None:
    total = cfg.total_step
    checks.integer("method.total_step (train.max_iter)", total, minimum=1, why="it is the number of training steps")
    if cfg.tinit + cfg.tfinal >= total:
        raise UserError(
            f"AdaLoRA's budget schedule needs method.tinit + method.tfinal < train.max_iter, but "
            f"{cfg.tinit} + {cfg.tfinal} >= {total}, which leaves no step to prune ranks in; lower "
            "method.tinit/method.tfinal or raise train.max_iter."
        )


# the initial rank the budget starts from, down to the configured target_rank (8 by default: a
# sampled target could exceed the sampled rank, which AdaLoRA refuses)
SEARCH_SPACE = (Int("rank", 8, 32, log=True), TARGET_SETS)


@register_method("adalora", config=AdaloraConfig, colour="#ad494a", block_aware=True, mergeable=True,
                 adds_parameters=True, order=42, search_space=SEARCH_SPACE,
                 summary="AdaLoRA: SVD-shaped low-rank updates, rank budget reallocated while training (HF peft)")
def apply(model, cfg: AdaloraConfig, adapter_name: str = "default"):
    import peft

    from peftseg.methods._peft import family_targets, inject

    if cfg.total_step is None:
        raise UserError(
            "method.total_step is unset: AdaLoRA's budget schedule spans the run's training steps, which "
            "conf/method/adalora.yaml takes from train.max_iter; compose the method with method=adalora "
            "(or set method.total_step=<train.max_iter>)."
        )
    peft_cfg = peft.AdaLoraConfig(
        init_r=cfg.rank,
        target_r=cfg.target_rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        tinit=cfg.tinit,
        tfinal=cfg.tfinal,
        deltaT=cfg.delta_t,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        orth_reg_weight=cfg.orth_reg_weight,
        total_step=cfg.total_step,
        target_modules=family_targets(model, cfg.targets, blocks=cfg.blocks, adapter_name=adapter_name),
        bias="none",
    )
    model = inject(model, peft_cfg, cfg.train_task_layers, "adalora", adapter_name)
    if cfg.orth_reg_weight > 0:
        import functools

        # peft adds this penalty in AdaLoraModel.forward only to a transformers output's `.loss`;
        # a detectron2 model returns a dict of losses in training, so it joins that dict here
        # (summed into the loss by the trainer, and logged as its own term)
        model.register_forward_hook(functools.partial(_add_orth_penalty, cfg.orth_reg_weight, adapter_name))
    return model


ORTH_LOSS = "loss_adalora_orth"


def orth_penalty(model, adapter_name: str = "default"):
    """peft's AdaLoRA regulariser: mean over the adapter's A and B of ||AAᵀ − I||_F / ||BᵀB − I||_F.
    Written here because peft computes it only inside AdaLoraModel.forward (see apply)."""
    import torch

    terms = []
    for module in model.modules():
        a, b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not hasattr(module, "lora_E") or a is None or adapter_name not in a:
            continue
        for cov in (a[adapter_name] @ a[adapter_name].T, b[adapter_name].T @ b[adapter_name]):
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    return torch.stack(terms).mean()


def _add_orth_penalty(weight: float, adapter_name: str, module, args, output):
    if not module.training or not isinstance(output, dict):  # inference: predictions, no loss
        return output
    return {**output, ORTH_LOSS: weight * orth_penalty(module, adapter_name)}
