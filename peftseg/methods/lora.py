"""Method `lora`: low-rank updates W + (alpha/r)·B·A on named target groups, through HF peft.

`use_rslora` scales by alpha/sqrt(r) instead (rank-stabilised); `use_dora` adds DoRA's
learned magnitude vector per output feature.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import peft
import torch.nn as nn

from peftseg.methods.peft_inject import check_alpha, check_dropout, check_rank, family_targets, inject


@dataclass
class LoraConfig:
    name: str = "lora"
    rank: int = 8
    alpha: float = 8.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attn_qkv", "attn_proj"])
    use_rslora: bool = False
    use_dora: bool = False
    train_heads: bool = True  # the family's task heads train too (FamilyMap.task_heads)


def apply(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    check_rank(cfg.rank)
    check_alpha(cfg.alpha)
    check_dropout(cfg.dropout)
    peft_cfg = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=family_targets(model, cfg.targets),
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        bias="none",
    )
    return inject(model, peft_cfg, cfg.train_heads)
