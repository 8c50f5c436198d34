"""Method `side` (E3VA-style side path): gradients never enter the backbone.

The frozen backbone runs as usual, and because none of its parameters or inputs needs a
gradient, autograd records no graph for it: no activations are stored, no backward runs
through it. Small trainable adapters read the (detached) output of each selected block,
project it to a `bottleneck`-wide space and sum it per output feature; one up-projection
per feature maps that sum back and adds it to the backbone's feature map, before the
neck. The up-projections start at zero, so at step 0 the model's outputs equal the base
model's exactly.

Parameters, per backbone feature f fed by k_f selected blocks of width d_f:
    k_f · (d_f·b + b)  +  (b·d_f + d_f)
(down projections with bias, one up projection with bias). The family map says which
blocks feed which feature (FamilyMap.side_features) and where the features leave the
backbone (FamilyMap.side_body).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftseg.methods.options import PeftOptions
from peftseg.registry import register_method
from peftseg.search_space import Int


@dataclass
class SideConfig(PeftOptions):  # + base_dtype, blocks, train_task_layers (here: which blocks feed the path)
    name: str = "side"
    bottleneck: int = 64  # width b of the side path
    activation: str = "gelu"  # gelu | relu, after each down projection

    def __post_init__(self) -> None:
        super().__post_init__()
        check_side_config(self)


def check_side_config(cfg: SideConfig) -> None:
    from peftseg.errors import UserError

    if isinstance(cfg.bottleneck, bool) or not isinstance(cfg.bottleneck, int) or cfg.bottleneck < 1:
        raise UserError(
            f"method.bottleneck must be a positive integer (got {cfg.bottleneck!r}); it is the "
            "width of the side path, e.g. method.bottleneck=64."
        )
    if cfg.activation not in ("gelu", "relu"):
        raise UserError(
            f"method.activation={cfg.activation!r} is not supported; choose gelu or relu, e.g. "
            "method.activation=gelu."
        )


@register_method("side", config=SideConfig, colour="#393b79", block_aware=True, adds_parameters=True, order=65,
                 search_space=(Int("bottleneck", 16, 128, log=True),),
                 summary="E3VA-style side path fed by the frozen backbone's blocks; no backward through it")
def apply(model, cfg: SideConfig):
    from peftseg.methods._side_path import apply_side

    check_side_config(cfg)
    return apply_side(model, cfg)
