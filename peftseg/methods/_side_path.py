"""The side path's modules and hooks (heavy half of `peftseg.methods.side`).

Attached without touching detectron2's classes, the way adapters are: the backbone body
(FamilyMap.side_body) gets a `peft_side` submodule and a forward hook that adds the
path's deltas to its output features; each selected block gets a forward hook that keeps
its detached output until the body's hook has read it. Hooks are module-level functions,
so deepcopy and pickle of the model keep working; `SidePath.detach(body)` takes the path and
all its hooks off again (peftseg.methods._attached).
"""

from __future__ import annotations

import copy
import re

import torch
import torch.nn as nn

from peftseg.errors import UserError
from peftseg.methods._attached import Attached
from peftseg.methods.options import selected_blocks
from peftseg.methods.freeze import train_only_added
from peftseg.models import family_of

_SLOT = "peftseg_side_out"  # attribute of a block holding its detached output for one forward
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def _key(feature: str) -> str:
    return feature.replace(".", "_")


class SidePath(nn.Module, Attached):
    """Per feature: a down projection per feeding block, one zero-initialised up projection.
    Attached as `body.peft_side`."""

    slot = "peft_side"

    def __init__(self, feeds: dict[str, list[tuple[str, int]]], bottleneck: int, activation: str):
        super().__init__()
        # feature -> block names relative to the body, in forward order
        self.feeds = {f: [name for name, _ in blocks] for f, blocks in feeds.items()}
        # ModuleDict keys cannot hold "."; feature keys such as "feature_maps.0" can
        self.down = nn.ModuleDict({
            _key(f): nn.ModuleList(nn.Linear(d, bottleneck) for _, d in blocks) for f, blocks in feeds.items()
        })
        self.up = nn.ModuleDict({_key(f): nn.Linear(bottleneck, blocks[-1][1]) for f, blocks in feeds.items()})
        for up in self.up.values():  # zero: the base model's outputs at init, bit for bit
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.act = ACTIVATIONS[activation]()

    def delta(self, feature: str, outputs: list[torch.Tensor]) -> torch.Tensor:
        s = None
        for down, x in zip(self.down[_key(feature)], outputs):
            h = self.act(down(x))
            s = h if s is None else s + h
        return self.up[_key(feature)](s)

    def register_hooks(self, body: nn.Module) -> list:
        handles = [body.get_submodule(n).register_forward_hook(_capture) for names in self.feeds.values() for n in names]
        return handles + [body.register_forward_hook(_add_side)]


def _capture(block: nn.Module, args, output):
    hidden = output[0] if isinstance(output, tuple) else output
    # detached: the side path's gradient must stop here, never enter the backbone
    setattr(block, _SLOT, hidden.detach())


def _feature(output, key: str) -> torch.Tensor:
    # a dict of named maps (detectron2 backbones), or "field.i" into a tuple field
    # (transformers' BackboneOutput.feature_maps)
    if key in output:
        return output[key]
    field, i = key.rsplit(".", 1)
    return output[field][int(i)]


def _with_feature(output, key: str, value: torch.Tensor):
    if key in output:
        output[key] = value
    else:
        field, i = key.rsplit(".", 1)
        maps = list(output[field])
        maps[int(i)] = value
        output[field] = tuple(maps)
    return output


def _add_side(body: nn.Module, args, output):
    side: SidePath = body.peft_side
    # a shallow copy: the caller's dict (or ModelOutput) is not changed behind its back
    out = copy.copy(output)
    for feature, names in side.feeds.items():
        blocks = [body.get_submodule(n) for n in names]
        xs = [getattr(b, _SLOT) for b in blocks]
        for b in blocks:
            delattr(b, _SLOT)  # the body's output is all that keeps them alive after this
        base = _feature(out, feature)  # (B, C, H, W)
        n, c, h, w = base.shape
        # block outputs are token-major ((B, H, W, C) in ViT, (B, H·W, C) in Swin)
        d = side.delta(feature, xs).reshape(n, h, w, c).permute(0, 3, 1, 2)
        out = _with_feature(out, feature, base + d.to(base.dtype))
    return out


def side_plan(model: nn.Module, cfg) -> tuple[nn.Module, str, dict[str, list[tuple[str, int]]]]:
    """(body module, body name, feature -> [(block name relative to the body, width)])."""
    family = family_of(model)
    if not family.side_body or not family.side_features:
        raise UserError(
            f"method=side needs the family to name where its backbone's features leave it "
            f"(FamilyMap.side_body/side_features), and model family {family.name!r} does not; "
            "use another method with this model (e.g. method=lora method.blocks=last:4)."
        )
    body = model.get_submodule(family.side_body)
    chosen = set(selected_blocks(model, cfg.blocks))
    prefix = family.side_body + "."
    feeds: dict[str, list[tuple[str, int]]] = {}
    modules = dict(model.named_modules())
    for feature, pattern in family.side_features.items():
        names = [n for n in modules if re.fullmatch(pattern, n) and n in chosen]
        if names:
            feeds[feature] = [(n[len(prefix):], _width(n, modules[n])) for n in names]
    if not feeds:
        raise UserError(
            f"method.blocks={cfg.blocks!r} selects no block that feeds the side path; select "
            "at least one backbone block (e.g. method.blocks=all)."
        )
    for feature, blocks in feeds.items():
        widths = {d for _, d in blocks}
        if len(widths) != 1:
            raise RuntimeError(f"side path: blocks feeding {feature} differ in width {sorted(widths)}")
    return body, family.side_body, feeds


def _width(name: str, block: nn.Module) -> int:
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"cannot infer the width of block {name}: it contains no nn.Linear.")
    return linears[-1].out_features  # the MLP's output: the block's residual width


def side_parameter_count(feeds: dict[str, list[tuple[str, int]]], b: int) -> int:
    """The closed form of the module docstring."""
    return sum(len(blocks) * (d * b + b) + (b * d + d) for blocks in feeds.values() for d in [blocks[-1][1]])


def apply_side(model: nn.Module, cfg) -> nn.Module:
    body, _, feeds = side_plan(model, cfg)
    if hasattr(body, "peft_side"):
        raise UserError("this model already carries a side path; apply method=side once per model.")
    side = SidePath(feeds, cfg.bottleneck, cfg.activation)
    ref = next(body.parameters(), None)
    if ref is not None:
        side.to(device=ref.device)
    side.attach(body)
    return train_only_added(model, list(side.parameters()), "side", cfg.train_task_layers)
