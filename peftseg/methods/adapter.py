"""Method `adapter`: bottleneck adapters after the attention and/or MLP of every block.

One adapter maps h to h + scale·up(act(down(h))), with down: d→b and up: b→d, so it has
2·d·b + d + b parameters. `up` starts at zero (weight and bias), which makes every
adapter the identity at step 0: the adapted model's outputs equal the base model's
exactly, bit for bit.

Sites come from the model's FamilyMap (`adapter_sites`), never from module paths:
- `attn`: N adapters in sequence on the attention sub-layer's output;
- `mlp`: N adapters in sequence on the MLP sub-layer's output;
- `mlp_parallel` (AdaptFormer): a branch on the MLP's *input* x whose delta is added to
  the MLP's output. With N > 1 the branch is the N adapters in sequence on x and the
  delta is branch(x) − x; it is summed from the per-adapter residuals instead of
  subtracted, so that no rounding creeps in and step 0 stays exact.

Adapters are attached without touching detectron2's classes: each site module gets a
`peft_adapters` ModuleList (base parameter names stay unchanged; the adapters' parameters
are recorded as this method's, so accounting counts them as `peft`) and a forward hook
that reads it. `remove_adapters` (in _adapter_layers.py) takes both away again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from peftseg.errors import UserError
from peftseg.registry import register_method
from peftseg.methods.options import PeftOptions
from peftseg.search_space import Choice, Int

SITES = ("attn", "mlp", "mlp_parallel")
ACTIVATION_NAMES = ("gelu", "relu")
MAX_PER_BLOCK = 4
# 1-3 adapters per block (the study's design space) of the widths adapter papers use
SEARCH_SPACE = (Int("adapters_per_block", 1, 3), Choice("bottleneck", (8, 16, 32, 64)))


@dataclass
class AdapterConfig(PeftOptions):  # + base_dtype, blocks, train_task_layers
    name: str = "adapter"
    adapters_per_block: int = 2  # stacked in sequence at each site; 0: no adapters
    sites: list[str] = field(default_factory=lambda: ["attn", "mlp"])  # attn | mlp | mlp_parallel
    # width b of every adapter. 0 (auto): min(64, d // 4) for each site's hidden width d, so
    # ViT-B gets the usual 64 and narrow CPU presets (d = 16..96) a width below d. Or set
    # `bottleneck` (fixed b) or `reduction` (b = d // reduction), not both.
    bottleneck: int = 0
    reduction: float = 0.0
    scale: float = 1.0
    activation: str = "gelu"  # gelu | relu

    def __post_init__(self) -> None:
        super().__post_init__()  # base_dtype, blocks
        n = self.adapters_per_block
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_PER_BLOCK:
            raise UserError(
                f"method.adapters_per_block must be an integer from 0 to {MAX_PER_BLOCK} (got {n!r}); "
                "it is how many adapters are stacked at each site of every block, e.g. "
                "method.adapters_per_block=2 (0 trains the task layers only)."
            )
        sites = list(self.sites)
        unknown = [s for s in sites if s not in SITES]
        if unknown:
            raise UserError(
                f"method.sites names {unknown}, which is not an adapter site; choose from "
                f"{list(SITES)}, e.g. method.sites=[attn,mlp]."
            )
        if len(set(sites)) != len(sites):
            raise UserError(
                f"method.sites={sites} lists a site twice; list each site once and use "
                "method.adapters_per_block to stack several adapters there."
            )
        if "mlp" in sites and "mlp_parallel" in sites:
            raise UserError(
                "method.sites has both 'mlp' and 'mlp_parallel', which place adapters on the same "
                "MLP in two ways; keep one of them, e.g. method.sites=[attn,mlp_parallel]."
            )
        if n > 0 and not sites:
            raise UserError(
                "method.sites is empty; list at least one adapter site (attn, mlp, mlp_parallel), "
                "or set method.adapters_per_block=0 to add no adapters."
            )
        if self.activation not in ACTIVATION_NAMES:
            raise UserError(
                f"method.activation={self.activation!r} is not supported; choose one of "
                f"{sorted(ACTIVATION_NAMES)}, e.g. method.activation=gelu."
            )
        if isinstance(self.scale, bool) or not math.isfinite(self.scale) or self.scale == 0:
            raise UserError(
                f"method.scale must be a finite, non-zero number (got {self.scale!r}); it multiplies "
                "each adapter's output (0 would leave the adapters without gradient), e.g. "
                "method.scale=1.0."
            )
        if self.reduction < 0 or not math.isfinite(self.reduction):
            raise UserError(
                f"method.reduction must be 0 (off) or a positive number (got {self.reduction!r}); "
                "with reduction > 0 each adapter's width is the hidden width // reduction, "
                "e.g. method.reduction=4."
            )
        if self.reduction > 0 and self.bottleneck != 0:
            raise UserError(
                f"method.bottleneck={self.bottleneck} and method.reduction={self.reduction} both set "
                "the adapter width; set only one of them: method.reduction=0 to use the bottleneck, "
                "or method.bottleneck=0 (the default, automatic) to use the reduction."
            )
        if self.bottleneck < 0:
            raise UserError(
                f"method.bottleneck={self.bottleneck} is negative; give the adapter width (e.g. "
                "method.bottleneck=64), or 0 for the automatic min(64, hidden width // 4)."
            )


@register_method("adapter", config=AdapterConfig, colour="#d62728", block_aware=True, adds_parameters=True, order=60, search_space=SEARCH_SPACE,
                 summary="bottleneck adapters (down-act-up, residual), N per block at attn/mlp sites")
def apply(model, cfg: AdapterConfig):
    from peftseg.methods._adapter_layers import add_adapters
    from peftseg.methods.freeze import train_only_added

    return train_only_added(model, add_adapters(model, cfg), "adapter", cfg.train_task_layers)
