"""Method `loha`: low-rank Hadamard product updates (LyCORIS LoHa), through HF peft.

The update is (B1·A1) ⊙ (B2·A2) · alpha/r, so rank r costs 2·r·(in+out) parameters but
reaches rank up to r² per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import peft
import torch.nn as nn

from peftseg.methods.peft_inject import check_alpha, check_dropout, check_rank, family_targets, inject


@dataclass
class LohaConfig:
    name: str = "loha"
    rank: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attn_qkv", "attn_proj"])
    train_heads: bool = True


def apply(model: nn.Module, cfg: LohaConfig) -> nn.Module:
    check_rank(cfg.rank)
    check_alpha(cfg.alpha)
    check_dropout(cfg.rank_dropout, "method.rank_dropout")
    check_dropout(cfg.module_dropout, "method.module_dropout")
    peft_cfg = peft.LoHaConfig(
        r=cfg.rank,
        alpha=cfg.alpha,
        rank_dropout=cfg.rank_dropout,
        module_dropout=cfg.module_dropout,
        target_modules=family_targets(model, cfg.targets),
    )
    return inject(model, peft_cfg, cfg.train_heads)
