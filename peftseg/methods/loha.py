"""Method `loha`: low-rank Hadamard product updates (LyCORIS LoHa), through HF peft.

The update is (B1·A1) ⊙ (B2·A2) · alpha/r, so rank r costs 2·r·(in+out) parameters but
reaches rank up to r² per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftseg.methods.lowrank import TARGET_SETS, LowRankConfig, check_alpha, check_probability
from peftseg.registry import register_method
from peftseg.search_space import Int


@dataclass
class LohaConfig(LowRankConfig):
    name: str = "loha"
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_alpha(self.alpha)
        check_probability("method.rank_dropout", self.rank_dropout)
        check_probability("method.module_dropout", self.module_dropout)


@register_method("loha", config=LohaConfig, colour="#8c564b", block_aware=True, mergeable=True, adds_parameters=True, order=50,
                 search_space=(Int("rank", 2, 32, log=True), TARGET_SETS),
                 summary="LyCORIS Hadamard-product low-rank updates (HF peft)")
def apply(model, cfg: LohaConfig, adapter_name: str = "default"):
    import peft

    from peftseg.methods._peft import family_targets, inject

    peft_cfg = peft.LoHaConfig(
        r=cfg.rank,
        alpha=cfg.alpha,
        rank_dropout=cfg.rank_dropout,
        module_dropout=cfg.module_dropout,
        target_modules=family_targets(model, cfg.targets, blocks=cfg.blocks, adapter_name=adapter_name),
    )
    return inject(model, peft_cfg, cfg.train_task_layers, "loha", adapter_name)
