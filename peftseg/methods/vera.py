"""Method `vera`: VeRA, through HF peft — one pair of frozen random projections shared by
every targeted layer, and per layer only two trainable scaling vectors.

The update of a Linear (in → out) is diag(b)·B·diag(d)·A with A (r × in) and B (out × r)
drawn once from `projection_prng_key` and frozen, so each targeted Linear trains only
d (r values) and b (out values): rank + out_features parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftseg import checks
from peftseg.methods.lowrank import TARGET_SETS, LowRankConfig, check_probability
from peftseg.registry import register_method
from peftseg.search_space import Int


@dataclass
class VeraConfig(LowRankConfig):
    name: str = "vera"
    rank: int = 256  # VeRA's projections are cheap (frozen, shared), so its rank is high
    dropout: float = 0.0
    d_initial: float = 0.1  # initial value of the d vector (b starts at 0: identity at step 0)
    projection_prng_key: int = 0  # seed of the shared random projections

    def __post_init__(self) -> None:
        super().__post_init__()
        check_probability("method.dropout", self.dropout)
        checks.number("method.d_initial", self.d_initial, why="VeRA's paper uses 0.1")
        checks.integer("method.projection_prng_key", self.projection_prng_key, minimum=0)


@register_method("vera", config=VeraConfig, colour="#17becf", block_aware=True, mergeable=True, adds_parameters=True, order=45,
                 search_space=(Int("rank", 64, 512, log=True), TARGET_SETS),
                 summary="VeRA: shared frozen random projections, trainable scaling vectors (HF peft)")
def apply(model, cfg: VeraConfig, adapter_name: str = "default"):
    import peft

    from peftseg.methods._peft import family_targets, inject

    peft_cfg = peft.VeraConfig(
        r=cfg.rank,
        target_modules=family_targets(model, cfg.targets, blocks=cfg.blocks, adapter_name=adapter_name),
        projection_prng_key=cfg.projection_prng_key,
        vera_dropout=cfg.dropout,
        d_initial=cfg.d_initial,
        # the projections are redrawn from projection_prng_key when loaded (peft's documented
        # option), so the exported adapter holds only the trained vectors
        save_projection=False,
        bias="none",
    )
    return inject(model, peft_cfg, cfg.train_task_layers, "vera", adapter_name)
