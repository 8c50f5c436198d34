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
`peft_adapters` ModuleList (so parameter names gain `peft_adapters.`, which accounting
counts as `peft`, and base names stay unchanged) and a forward hook that reads it.
`remove_adapters` takes both away again.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from peftseg.errors import UserError
from peftseg.methods.freeze import freeze_all, unfreeze_params, unfreeze_task_heads
from peftseg.models import family_of

SITES = ("attn", "mlp", "mlp_parallel")
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}
MAX_PER_BLOCK = 4
DEFAULT_BOTTLENECK = 64  # AdaptFormer's width on ViT-B (d=768)


@dataclass
class AdapterConfig:
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
    train_heads: bool = True  # neck + heads train next to the adapters (they start untrained)


class BottleneckAdapter(nn.Module):
    def __init__(self, dim: int, bottleneck: int, activation: str, scale: float):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        # identity at init: the base model's outputs stay exactly as they were
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def residual(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.act(self.down(h)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.residual(h)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class AdapterStack(nn.ModuleList):
    """The adapters of one site; `parallel` marks the AdaptFormer placement."""

    def __init__(self, adapters: list[BottleneckAdapter] | None = None, parallel: bool = False):
        super().__init__(adapters)
        self.parallel = parallel

    def sequential(self, h: torch.Tensor) -> torch.Tensor:
        for adapter in self:
            h = adapter(h)
        return h

    def parallel_delta(self, x: torch.Tensor) -> torch.Tensor:
        """branch(x) − x for the branch of adapters in sequence, as a sum of residuals."""
        delta = None
        for adapter in self:
            r = adapter.residual(x)
            x = x + r
            delta = r if delta is None else delta + r
        return delta


def _adapter_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    # module level, not a closure: deepcopy and pickle of the model keep working, and
    # remove_adapters finds the hook by identity
    stack: AdapterStack = module.peft_adapters
    hidden = output[0] if isinstance(output, tuple) else output
    if stack.parallel:
        x = _first_tensor(args, kwargs, module)
        hidden = hidden + stack.parallel_delta(x)
    else:
        hidden = stack.sequential(hidden)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _first_tensor(args: tuple, kwargs: dict, module: nn.Module) -> torch.Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise RuntimeError(
        f"a parallel adapter on {type(module).__name__} needs the module's input tensor, but "
        "it was called without one"
    )


def _check_config(cfg: AdapterConfig) -> tuple[int, list[str]]:
    n = cfg.adapters_per_block
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_PER_BLOCK:
        raise UserError(
            f"method.adapters_per_block must be an integer from 0 to {MAX_PER_BLOCK} (got {n!r}); "
            "it is how many adapters are stacked at each site of every block, e.g. "
            "method.adapters_per_block=2 (0 trains neck and heads only)."
        )
    sites = list(cfg.sites)
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
    if cfg.activation not in ACTIVATIONS:
        raise UserError(
            f"method.activation={cfg.activation!r} is not supported; choose one of "
            f"{sorted(ACTIVATIONS)}, e.g. method.activation=gelu."
        )
    if isinstance(cfg.scale, bool) or not math.isfinite(cfg.scale) or cfg.scale == 0:
        raise UserError(
            f"method.scale must be a finite, non-zero number (got {cfg.scale!r}); it multiplies "
            "each adapter's output (0 would leave the adapters without gradient), e.g. "
            "method.scale=1.0."
        )
    if cfg.reduction < 0 or not math.isfinite(cfg.reduction):
        raise UserError(
            f"method.reduction must be 0 (off) or a positive number (got {cfg.reduction!r}); "
            "with reduction > 0 each adapter's width is the hidden width // reduction, "
            "e.g. method.reduction=4."
        )
    if cfg.reduction > 0 and cfg.bottleneck != 0:
        raise UserError(
            f"method.bottleneck={cfg.bottleneck} and method.reduction={cfg.reduction} both set "
            "the adapter width; set only one of them: method.reduction=0 to use the bottleneck, "
            "or method.bottleneck=0 (the default, automatic) to use the reduction."
        )
    if cfg.bottleneck < 0:
        raise UserError(
            f"method.bottleneck={cfg.bottleneck} is negative; give the adapter width (e.g. "
            "method.bottleneck=64), or 0 for the automatic min(64, hidden width // 4)."
        )
    return n, sites


def _site_modules(model: nn.Module, site: str) -> list[tuple[str, nn.Module]]:
    family = family_of(model)
    known = ", ".join(family.adapter_sites) or "none"
    key = "mlp" if site == "mlp_parallel" else site
    if key not in family.adapter_sites:
        raise UserError(
            f"method.sites names {site!r}, but model family {family.name!r} defines no {key!r} "
            f"adapter site; the sites it has are: {known}. Drop {site!r} from method.sites."
        )
    pattern = family.adapter_sites[key]
    hits = [(n, m) for n, m in model.named_modules() if re.fullmatch(pattern, n)]
    if not hits:
        raise UserError(
            f"method.sites {site!r} (pattern {pattern!r}) matches no module of this "
            f"{family.name} model; the sites of this family are: {known}. Drop {site!r} from "
            "method.sites."
        )
    return hits


def _hidden_width(name: str, module: nn.Module, site: str) -> int:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(
            f"cannot infer the hidden width of adapter site {site!r} at {name} "
            f"({type(module).__name__}): it contains no nn.Linear; drop {site!r} from method.sites."
        )
    d = linears[-1].out_features
    if site == "mlp_parallel" and linears[0].in_features != d:
        raise UserError(
            f"method.sites 'mlp_parallel' needs an MLP whose input and output widths agree, but "
            f"{name} maps {linears[0].in_features} to {d} features; use method.sites=[…,mlp] "
            "to place the adapter after the MLP instead."
        )
    return d


def adapter_width(cfg: AdapterConfig, d: int) -> int:
    """The bottleneck width b the config gives for a site of hidden width d."""
    if cfg.reduction > 0:
        return int(d // cfg.reduction)
    return cfg.bottleneck or min(DEFAULT_BOTTLENECK, max(1, d // 4))


def _bottleneck(cfg: AdapterConfig, d: int, name: str) -> int:
    b = adapter_width(cfg, d)
    if not 1 <= b < d:
        how = (
            f"method.reduction={cfg.reduction} gives a width of {d} // {cfg.reduction} = {b}"
            if cfg.reduction > 0 else f"method.bottleneck={b}"
        )
        raise UserError(
            f"{how}, but the adapter width must be at least 1 and below the hidden width d={d} "
            f"of {name}; choose method.bottleneck from 1 to {d - 1} (e.g. method.bottleneck="
            f"{max(1, d // 4)}), or method.reduction above 1 and at most {d} (e.g. method.reduction=4)."
        )
    return b


def add_adapters(model: nn.Module, cfg: AdapterConfig) -> list[nn.Parameter]:
    """Attach the adapters `cfg` describes; return their parameters. Validates everything
    before changing the model, so a refused config leaves it untouched."""
    n, sites = _check_config(cfg)
    plan: list[tuple[nn.Module, int, int, bool]] = []
    for site in sites:
        for name, module in _site_modules(model, site):
            if hasattr(module, "peft_adapters"):
                raise UserError(
                    f"{name} already carries adapters (from an earlier adapter method or a "
                    "site listed twice by the family); apply the adapter method once per model."
                )
            d = _hidden_width(name, module, site)
            plan.append((module, d, _bottleneck(cfg, d, name), site == "mlp_parallel"))
    if n == 0:
        return []
    params: list[nn.Parameter] = []
    for module, d, b, parallel in plan:
        ref = next(module.parameters(), None)
        stack = AdapterStack(
            [BottleneckAdapter(d, b, cfg.activation, float(cfg.scale)) for _ in range(n)], parallel
        )
        if ref is not None:  # same device and dtype as the block it adapts
            stack.to(device=ref.device, dtype=ref.dtype)
        module.peft_adapters = stack
        module.register_forward_hook(_adapter_hook, with_kwargs=True)
        params += list(stack.parameters())
    return params


def remove_adapters(model: nn.Module) -> nn.Module:
    """Take every adapter and its hook off `model`, leaving the original module tree."""
    for module in list(model.modules()):
        hook_ids = [i for i, fn in module._forward_hooks.items() if fn is _adapter_hook]
        for i in hook_ids:
            # what RemovableHandle.remove() does; the handle itself is not kept because a
            # deepcopy of it would still point at the original module's hook dict
            del module._forward_hooks[i]
            module._forward_hooks_with_kwargs.pop(i, None)
            module._forward_hooks_always_called.pop(i, None)
        if isinstance(getattr(module, "peft_adapters", None), AdapterStack):
            del module.peft_adapters
    return model


def apply(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    added = add_adapters(model, cfg)
    freeze_all(model)
    unfreeze_params(model, [id(p) for p in added])
    if cfg.train_heads:
        unfreeze_task_heads(model)
    return model
