"""Method `lora`: low-rank updates W + (alpha/r)·B·A on named target groups, through HF peft.

`use_rslora` scales by alpha/sqrt(r) instead (rank-stabilised); `use_dora` adds DoRA's
learned magnitude vector per output feature.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftseg.methods.lowrank import TARGET_SETS, LowRankConfig, check_alpha, check_probability
from peftseg.registry import register_method
from peftseg.search_space import Float, Int

# ranks of 2 to 32 and scales alpha/rank around 1, as LoRA papers on ViTs tune them
SEARCH_SPACE = (Int("rank", 2, 32, log=True), Float("alpha", 2.0, 64.0, log=True), TARGET_SETS)


@dataclass
class LoraConfig(LowRankConfig):
    name: str = "lora"
    alpha: float = 8.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    use_rslora: bool = False  # scale by alpha / sqrt(rank)
    use_dora: bool = False  # DoRA: learned magnitude per output feature

    def __post_init__(self) -> None:
        super().__post_init__()
        check_alpha(self.alpha)
        check_probability("method.dropout", self.dropout)


@register_method("lora", config=LoraConfig, colour="#9467bd", block_aware=True, mergeable=True, adds_parameters=True, order=40, search_space=SEARCH_SPACE,
                 summary="low-rank updates W + (alpha/r)BA on target groups (HF peft); rsLoRA, DoRA")
def apply(model, cfg: LoraConfig, adapter_name: str = "default"):
    import peft

    from peftseg.methods._peft import family_targets, inject

    peft_cfg = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=family_targets(model, cfg.targets, blocks=cfg.blocks, adapter_name=adapter_name, convs=True),
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        bias="none",
    )
    return inject(model, peft_cfg, cfg.train_task_layers, "lora", adapter_name)
