"""Method `ia3`: learned per-feature scaling vectors (IA3), through HF peft.

IA3 scales a targeted Linear's output, or its input for the groups listed in
`feedforward` (the paper scales the MLP's hidden activation, i.e. fc2's input).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftseg.errors import UserError
from peftseg.registry import register_method
from peftseg.methods.options import PeftOptions
from peftseg.search_space import Choice

# every set keeps `mlp`, the preset's feedforward group, which must stay among the targets
SEARCH_SPACE = (Choice("targets", (("attn_qkv", "mlp"), ("attn_qkv", "attn_proj", "mlp"))),)


@dataclass
class Ia3Config(PeftOptions):  # + base_dtype, blocks, train_task_layers
    name: str = "ia3"
    targets: list[str] = field(default_factory=lambda: ["attn_qkv", "mlp"])
    feedforward: list[str] = field(default_factory=lambda: ["mlp"])  # subset of targets

    def __post_init__(self) -> None:
        super().__post_init__()  # base_dtype, blocks
        if not list(self.targets):
            raise UserError("method.targets is empty; list at least one target group, e.g. method.targets=[attn_qkv,mlp].")
        stray = [g for g in self.feedforward if g not in self.targets]
        if stray:
            raise UserError(
                f"method.feedforward lists {stray}, which are not in method.targets={list(self.targets)}; "
                "IA3 can only scale the input of a module it targets, so add them to method.targets "
                "or drop them from method.feedforward."
            )


@register_method("ia3", config=Ia3Config, colour="#7f7f7f", block_aware=True, mergeable=True, adds_parameters=True, order=30, search_space=SEARCH_SPACE,
                 summary="learned scaling vectors on target outputs / feed-forward inputs (HF peft)")
def apply(model, cfg: Ia3Config, adapter_name: str = "default"):
    import peft

    from peftseg.methods._peft import family_targets, inject, target_regex
    from peftseg.models import family_of

    targets = family_targets(model, cfg.targets, blocks=cfg.blocks, adapter_name=adapter_name)
    peft_cfg = peft.IA3Config(
        target_modules=targets,
        # an empty regex would fullmatch nothing; peft wants a list then
        feedforward_modules=target_regex(family_of(model), list(cfg.feedforward)) if cfg.feedforward else [],
    )
    return inject(model, peft_cfg, cfg.train_task_layers, "ia3", adapter_name)
