"""Method `lora`: low-rank updates W + (alpha/r)·B·A on named target groups, through HF peft.

`use_rslora` scales by alpha/sqrt(r) instead (rank-stabilised); `use_dora` adds DoRA's
learned magnitude vector per output feature. `init` picks how A and B start (peft's
initialisations, peftseg.methods._lora_init); `rank_pattern` / `alpha_pattern` give target
groups (or module regexes) their own rank and alpha.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

from peftseg import checks
from peftseg.errors import UserError
from peftseg.methods.lowrank import TARGET_SETS, LowRankConfig, check_alpha, check_probability
from peftseg.registry import register_method
from peftseg.search_space import Choice, Float, Int

INITS = ("default", "gaussian", "pissa", "olora", "orthogonal", "eva", "corda")
_MUTATING = ("pissa", "olora", "corda")  # rewrite the base weight into a residual

# ranks of 2 to 32 and scales alpha/rank around 1, as LoRA papers on ViTs tune them; the
# starts that need no training batches (eva/corda run forward passes first: `method.init=eva`
# by hand); rank patterns are model-specific, so they are not searched
SEARCH_SPACE = (Int("rank", 2, 32, log=True), Float("alpha", 2.0, 64.0, log=True), TARGET_SETS,
                Choice("init", ("default", "gaussian", "pissa", "olora")))


@dataclass
class LoraConfig(LowRankConfig):
    name: str = "lora"
    alpha: float = 8.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    use_rslora: bool = False  # scale by alpha / sqrt(rank)
    use_dora: bool = False  # DoRA: learned magnitude per output feature
    # how A and B start: default (A Kaiming-uniform, B zero) | gaussian | pissa (top-r SVD of W) |
    # olora (QR of W) | orthogonal | eva (SVD of train activations) | corda (train-activation covariance)
    init: str = "default"
    init_batches: int = 4  # eva/corda: batches of the run's train loader their start is computed from
    # null, or {target group or module regex: rank}, e.g. {mlp: 16}; other targets use method.rank
    # (typed Any: Hydra cannot set a typed dict field from the command line)
    rank_pattern: Any = None
    # null, or {target group or module regex: alpha}, e.g. {mlp: 32}; other targets use method.alpha
    alpha_pattern: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_alpha(self.alpha)
        check_probability("method.dropout", self.dropout)
        check_init(self)


def check_init(cfg: LoraConfig) -> None:
    """The combinations of init, rank, DoRA and storage that peft and the conversion support."""
    checks.choice("method.init", cfg.init, INITS)
    checks.integer("method.init_batches", cfg.init_batches, minimum=1,
                   why="eva/corda compute the start from that many training batches, e.g. method.init_batches=4")
    for field_name in ("rank_pattern", "alpha_pattern"):
        value = getattr(cfg, field_name)
        if value is not None and not isinstance(value, Mapping):
            raise UserError(f"method.{field_name}={value!r} is not a mapping; give target group (or module regex) "
                            f"-> value pairs, e.g. method.{field_name}={{mlp: 16}}, or leave it null.")
    for key, value in dict(cfg.rank_pattern or {}).items():
        checks.integer(f"method.rank_pattern.{key}", value, minimum=1, why="it is that group's LoRA rank")
    for key, value in dict(cfg.alpha_pattern or {}).items():
        check_alpha(value)
    if cfg.init == "orthogonal":
        odd = [r for r in (cfg.rank, *dict(cfg.rank_pattern or {}).values()) if r % 2]
        if odd:
            raise UserError(f"method.init=orthogonal pairs rows of an orthogonal matrix, so every rank must be even, "
                            f"but rank {odd[0]} is odd; use an even method.rank (and rank_pattern values), e.g. 8.")
    if cfg.init in _MUTATING and cfg.use_dora:
        raise UserError(
            f"method.init={cfg.init} with method.use_dora=true is not supported: the {cfg.init} start rewrites the "
            "base weight, and its checkpoint is saved as a plain LoRA on the untouched base, which is done for LoRA "
            f"without DoRA; set method.use_dora=false, or use method.init=default with DoRA."
        )
    if cfg.init in _MUTATING and cfg.base_dtype != "fp32":
        raise UserError(
            f"method.init={cfg.init} with method.base_dtype={cfg.base_dtype} is not supported: the residual base "
            f"W - scale*B*A that {cfg.init} trains on would be rounded to {cfg.base_dtype}, so the model saved "
            "relative to the untouched base would not be the one trained; use method.base_dtype=fp32."
        )


@register_method("lora", config=LoraConfig, colour="#9467bd", block_aware=True, mergeable=True, adds_parameters=True, order=40, search_space=SEARCH_SPACE,
                 summary="low-rank updates W + (alpha/r)BA on target groups (HF peft); rsLoRA, DoRA, PiSSA/OLoRA/EVA/CorDA starts, per-group ranks")
def apply(model, cfg: LoraConfig, adapter_name: str = "default"):
    import peft

    from peftseg.methods import _lora_init
    from peftseg.methods._peft import family_targets, inject, targeted_modules
    from peftseg.models import family_of

    target = family_targets(model, cfg.targets, blocks=cfg.blocks, adapter_name=adapter_name, convs=True)
    targeted = [name for name, _ in targeted_modules(model, target)]
    groups = family_of(model).lora_targets
    _lora_init.check_layers(model, targeted, cfg.init, "method.init")
    peft_cfg = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        bias="none",
        init_lora_weights=_lora_init.PEFT_INIT[cfg.init],
        rank_pattern=_lora_init.resolve_pattern(model, targeted, cfg.rank_pattern or {}, "method.rank_pattern", groups),
        alpha_pattern=_lora_init.resolve_pattern(model, targeted, cfg.alpha_pattern or {}, "method.alpha_pattern", groups),
        **_lora_init.init_configs(cfg.init),
    )
    return _lora_init.inject_with_init(
        model, peft_cfg, cfg, adapter_name, targeted,
        lambda: inject(model, peft_cfg, cfg.train_task_layers, "lora", adapter_name))
