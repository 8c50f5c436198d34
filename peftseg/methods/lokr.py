"""Method `lokr`: Kronecker-product updates (LyCORIS LoKr), through HF peft.

The update is W1 ⊗ (B·A): peft splits each Linear's in/out sizes into factors
(`decompose_factor`, -1 = as square as possible) and keeps the smaller factor dense.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftseg import checks
from peftseg.methods.lowrank import TARGET_SETS, LowRankConfig, check_alpha, check_probability
from peftseg.registry import register_method
from peftseg.search_space import Int


@dataclass
class LokrConfig(LowRankConfig):
    name: str = "lokr"
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    decompose_factor: int = -1  # -1: as square as possible
    decompose_both: bool = False  # also low-rank the smaller Kronecker factor

    def __post_init__(self) -> None:
        super().__post_init__()
        check_alpha(self.alpha)
        check_probability("method.rank_dropout", self.rank_dropout)
        check_probability("method.module_dropout", self.module_dropout)
        if self.decompose_factor != -1:
            checks.integer("method.decompose_factor", self.decompose_factor, minimum=1,
                           why="-1 splits each size as squarely as possible")


@register_method("lokr", config=LokrConfig, colour="#e377c2", block_aware=True, mergeable=True, adds_parameters=True, order=55,
                 search_space=(Int("rank", 2, 32, log=True), TARGET_SETS),
                 summary="LyCORIS Kronecker-product low-rank updates (HF peft)")
def apply(model, cfg: LokrConfig, adapter_name: str = "default"):
    import peft

    from peftseg.methods._peft import family_targets, inject

    peft_cfg = peft.LoKrConfig(
        r=cfg.rank,
        alpha=cfg.alpha,
        rank_dropout=cfg.rank_dropout,
        module_dropout=cfg.module_dropout,
        decompose_factor=cfg.decompose_factor,
        decompose_both=cfg.decompose_both,
        target_modules=family_targets(model, cfg.targets, blocks=cfg.blocks, adapter_name=adapter_name),
    )
    return inject(model, peft_cfg, cfg.train_task_layers, "lokr", adapter_name)
