"""Method `lokr`: Kronecker-product updates (LyCORIS LoKr), through HF peft.

The update is W1 ⊗ (B·A): peft splits each Linear's in/out sizes into factors
(`decompose_factor`, -1 = as square as possible) and keeps the smaller factor dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import peft
import torch.nn as nn

from peftseg.methods.peft_inject import check_alpha, check_dropout, check_rank, family_targets, inject


@dataclass
class LokrConfig:
    name: str = "lokr"
    rank: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    decompose_factor: int = -1
    decompose_both: bool = False  # also low-rank the smaller Kronecker factor
    targets: list[str] = field(default_factory=lambda: ["attn_qkv", "attn_proj"])
    train_heads: bool = True


def apply(model: nn.Module, cfg: LokrConfig) -> nn.Module:
    check_rank(cfg.rank)
    check_alpha(cfg.alpha)
    check_dropout(cfg.rank_dropout, "method.rank_dropout")
    check_dropout(cfg.module_dropout, "method.module_dropout")
    peft_cfg = peft.LoKrConfig(
        r=cfg.rank,
        alpha=cfg.alpha,
        rank_dropout=cfg.rank_dropout,
        module_dropout=cfg.module_dropout,
        decompose_factor=cfg.decompose_factor,
        decompose_both=cfg.decompose_both,
        target_modules=family_targets(model, cfg.targets),
    )
    return inject(model, peft_cfg, cfg.train_heads)
