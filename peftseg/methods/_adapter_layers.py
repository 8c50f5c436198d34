"""The nn.Modules of method `adapter` and how they are attached to (and taken off) a model.

Heavy half of peftseg/methods/adapter.py (which holds the config and registration): this
module imports torch, so the registry never imports it at start-up.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn

from peftseg.errors import UserError
from peftseg.models import family_of
from peftseg.params import forget_added
from peftseg.methods._attached import Attached
from peftseg.methods.options import outside, unselected_blocks

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


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


class AdapterStack(nn.ModuleList, Attached):
    """The adapters of one site (`site.peft_adapters`, read by a forward hook on the site);
    `parallel` marks the AdaptFormer placement."""

    slot = "peft_adapters"

    def __init__(self, adapters: list[BottleneckAdapter] | None = None, parallel: bool = False):
        super().__init__(adapters)
        self.parallel = parallel

    def register_hooks(self, host: nn.Module) -> list:
        return [host.register_forward_hook(_adapter_hook, with_kwargs=True)]

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
    # module level, not a closure: deepcopy and pickle of the model keep working
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


def _site_modules(model: nn.Module, site: str, blocks="all") -> list[tuple[str, nn.Module]]:
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
    excluded = unselected_blocks(model, blocks)  # method.blocks leaves these bare
    kept = set(outside([n for n, _ in hits], excluded))
    if hits and not kept:
        raise UserError(
            f"method.blocks={blocks!r} leaves no {site!r} adapter site: all of them sit in "
            "blocks the selection skips; select other blocks or other sites."
        )
    hits = [(n, m) for n, m in hits if n in kept]
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


DEFAULT_BOTTLENECK = 64  # AdaptFormer's width on ViT-B (d=768)


def adapter_width(cfg, d: int) -> int:
    """The bottleneck width b the config gives for a site of hidden width d."""
    if cfg.reduction > 0:
        return int(d // cfg.reduction)
    return cfg.bottleneck or min(DEFAULT_BOTTLENECK, max(1, d // 4))


def _bottleneck(cfg, d: int, name: str) -> int:
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


def add_adapters(model: nn.Module, cfg) -> list[nn.Parameter]:  # cfg: the adapter method's config
    """Attach the adapters `cfg` describes; return their parameters. Validates everything
    before changing the model, so a refused config leaves it untouched."""
    n, sites = cfg.adapters_per_block, list(cfg.sites)
    plan: list[tuple[nn.Module, int, int, bool]] = []
    for site in sites:
        for name, module in _site_modules(model, site, cfg.blocks):
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
        stack.attach(module)
        params += list(stack.parameters())
    return params


def remove_adapters(model: nn.Module) -> nn.Module:
    """Take every adapter and its hook off `model`, leaving the original module tree."""
    for module in list(model.modules()):
        stack = getattr(module, AdapterStack.slot, None)
        if isinstance(stack, AdapterStack):
            stack.detach(module)
    forget_added(model, "adapter")
    return model
