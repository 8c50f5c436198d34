"""The nn.Modules of method `mona` and how they are attached to (and taken off) a block.

Heavy half of peftseg/methods/mona.py (config, closed form, registration). Mona is the
project's own code: no maintained library offers it for detectron2/transformers blocks
(the paper's code is mmdetection-specific copies of Swin blocks).

Placement without touching detectron2's or transformers' classes. In every block the
families name (FamilyMap.token_grid), the stream after the attention residual, s, is the
input of the pre-MLP norm, and the block returns s + mlp(norm(s)). Mona after attention
turns s into s' = s + δ(s) for everything after it, i.e. the block must return
s' + mlp(norm(s')) = [s + mlp(norm(s'))] + δ(s). So:
- a forward pre-hook on the norm replaces its input s by s + δ(s) (the MLP sees s'), and
  keeps δ(s);
- a forward hook on the block adds the kept δ(s) to the block's output (the residual gets
  s'), then applies the Mona after the MLP to that output.
A forward pre-hook on the block records the grid (H, W) where the block holds it outside
its tokens (Swin) and opens the call. Under activation checkpointing the block's forward
is recomputed in backward without the block's hooks: the norm's pre-hook then recomputes
s' (the MLP's recomputation matches) but keeps nothing, since no block hook will take it.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
import torch.nn as nn

from peftseg.errors import UserError
from peftseg.methods._attached import Attached
from peftseg.methods.options import outside, unselected_blocks
from peftseg.models import family_of
from peftseg.params import forget_added

# the paper's scaled LayerNorm: LN(x)·s1 + x·s2 with s1 = 1e-6 and s2 = 1 at init
NORM_SCALE_INIT = 1e-6


class MultiCognitiveFilter(nn.Module):
    """Depthwise 3×3, 5×5, 7×7 convolutions averaged (+ input), then a 1×1 (+ input)."""

    KERNELS = (3, 5, 7)

    def __init__(self, channels: int):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels) for k in self.KERNELS
        )
        self.aggregate = nn.Conv2d(channels, channels, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, m, H, W)
        z = sum(conv(z) for conv in self.convs) / len(self.convs) + z
        return z + self.aggregate(z)


class Mona(nn.Module):
    def __init__(self, dim: int, bottleneck: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.norm_scale = nn.Parameter(torch.full((dim,), NORM_SCALE_INIT))
        self.input_scale = nn.Parameter(torch.ones(dim))
        self.down = nn.Linear(dim, bottleneck)
        self.filter = MultiCognitiveFilter(bottleneck)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        # identity at init (the paper keeps the default init here): outputs equal the base's
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def delta(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Mona(x) − x for tokens x of shape (B, H, W, d) or (B, H·W, d) on grid (H, W)."""
        h, w = grid
        z = self.down(self.norm(x) * self.norm_scale + x * self.input_scale)
        b, m = z.shape[0], z.shape[-1]
        if z.numel() != b * h * w * m:
            raise RuntimeError(
                f"Mona got tokens of shape {tuple(x.shape)}, which is not a {h}x{w} grid per image"
            )
        z = self.filter(z.reshape(b, h, w, m).permute(0, 3, 1, 2))
        z = z.permute(0, 2, 3, 1).reshape(x.shape[:-1] + (m,))
        return self.up(self.drop(self.act(z)))


class MonaSites(nn.Module, Attached):
    """The Monas of one block (`attn`, `mlp`, either may be None) and the per-call state the
    hooks share. Attached as `block.peft_mona`; `norm` names the block's pre-MLP norm."""

    slot = "peft_mona"

    def __init__(self, attn: Mona | None, mlp: Mona | None, layout: str, norm: str):
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.layout = layout
        self.norm = norm
        self._clear()

    def register_hooks(self, block: nn.Module) -> list:
        handles = [block.register_forward_pre_hook(_block_pre_hook, with_kwargs=True),
                   block.register_forward_hook(_block_hook, with_kwargs=True)]
        if self.attn is not None:
            handles.append(getattr(block, self.norm).register_forward_pre_hook(functools.partial(_norm_pre_hook, self)))
        return handles

    def _clear(self) -> None:
        self._grid: tuple[int, int] | None = None
        self._open = False  # between the block's pre-hook and its hook
        self._attn_delta: torch.Tensor | None = None

    def grid_of(self, x: torch.Tensor) -> tuple[int, int]:
        if self.layout == "bhwc":
            return int(x.shape[1]), int(x.shape[2])
        if self._grid is None:
            raise RuntimeError("Mona: the block was run without its grid (H, W) being recorded")
        return self._grid

    def __getstate__(self) -> dict:
        # deepcopy/pickle between calls only: transient tensors are never copied
        state = self.__dict__.copy()
        state.update(_open=False, _attn_delta=None)
        return state

    def extra_repr(self) -> str:
        return f"layout={self.layout}"


def _grid_from_block(block: nn.Module, layout: str, args: tuple, kwargs: dict) -> tuple[int, int] | None:
    if layout == "block_hw":
        return int(block.H), int(block.W)
    if layout == "input_dimensions":
        dims = kwargs["input_dimensions"] if "input_dimensions" in kwargs else args[1]
        return int(dims[0]), int(dims[1])
    return None  # bhwc: read from the tokens themselves


def _block_pre_hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
    sites: MonaSites = block.peft_mona
    sites._grid = _grid_from_block(block, sites.layout, args, kwargs)
    sites._open = True
    sites._attn_delta = None


def _norm_pre_hook(sites: MonaSites, norm: nn.Module, args: tuple) -> tuple:
    s = args[0]
    delta = sites.attn.delta(s, sites.grid_of(s))
    if sites._open:  # not in a checkpoint's recomputation: the block hook takes it
        sites._attn_delta = delta
    return (s + delta, *args[1:])


def _block_hook(block: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    sites: MonaSites = block.peft_mona
    hidden = output[0] if isinstance(output, tuple) else output
    try:
        if sites.attn is not None:
            if sites._attn_delta is None:
                raise RuntimeError(
                    f"Mona after attention: {type(block).__name__} ran without calling its pre-MLP "
                    "norm, so the stream after attention was never adapted"
                )
            hidden = hidden + sites._attn_delta
        if sites.mlp is not None:
            hidden = hidden + sites.mlp.delta(hidden, sites.grid_of(hidden))
    finally:
        # the grid stays: a checkpointed block's recomputation in backward reads it again
        sites._open, sites._attn_delta = False, None
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _grid_blocks(model: nn.Module, blocks) -> list[tuple[str, nn.Module]]:
    family = family_of(model)
    grid = family.token_grid
    names = [n for n, _ in model.named_modules() if family.backbone_blocks and re.fullmatch(family.backbone_blocks, n)]
    if grid is None or not names:
        raise UserError(
            f"method=mona convolves over a backbone's 2-D token grid, but this {family.name} model "
            "has no transformer backbone blocks with one (Mona needs a ViT or Swin backbone, e.g. "
            "model=vitdet_b, model=swin_t, model=maskdino_swin_l with backbone=swin); use "
            "method=adapter or method=lora for this model."
        )
    kept = set(outside(names, unselected_blocks(model, blocks)))
    modules = dict(model.named_modules())
    return [(n, modules[n]) for n in names if n in kept]


def _block_width(name: str, block: nn.Module, norm_name: str) -> int:
    norm = getattr(block, norm_name, None)
    shape = getattr(norm, "normalized_shape", None)
    if not isinstance(norm, nn.LayerNorm) or shape is None or len(shape) != 1:
        raise RuntimeError(f"{name}.{norm_name} is not the block's pre-MLP LayerNorm")
    return int(shape[0])


DEFAULT_BOTTLENECK = 64  # the paper's width, on every stage of Swin-B and on ViT-B


def mona_width(cfg, d: int) -> int:
    """The bottleneck width m the config gives for a block of width d."""
    return cfg.bottleneck or min(DEFAULT_BOTTLENECK, max(1, d // 2))


def add_mona(model: nn.Module, cfg) -> list[nn.Parameter]:  # cfg: the mona method's config
    """Attach the Monas `cfg` describes; return their parameters. Validates everything before
    changing the model, so a refused config leaves it untouched."""
    grid = family_of(model).token_grid
    plan = []
    for name, block in _grid_blocks(model, cfg.blocks):
        if hasattr(block, "peft_mona"):
            raise UserError(f"{name} already carries Monas; apply method=mona once per model.")
        if getattr(block, "use_residual_block", False):
            # detectron2's ViT residual conv block runs after the MLP residual, so the block's
            # output is not s + mlp(norm(s)) and the attn site could not be placed exactly
            raise UserError(
                f"{name} ends in a residual conv block (ViT residual_block_indexes), after which "
                "Mona cannot be placed; build the model without residual blocks."
            )
        d = _block_width(name, block, grid.norm)
        m = mona_width(cfg, d)
        if not 1 <= m < d:
            raise UserError(
                f"method.bottleneck={m} is not below the width d={d} of {name}; choose "
                f"method.bottleneck from 1 to {d - 1}, or 0 for the automatic min(64, d // 2)."
            )
        plan.append((block, d, m))
    params: list[nn.Parameter] = []
    for block, d, m in plan:
        sites = MonaSites(
            Mona(d, m, float(cfg.dropout)) if "attn" in cfg.sites else None,
            Mona(d, m, float(cfg.dropout)) if "mlp" in cfg.sites else None,
            grid.layout,
            grid.norm,
        )
        ref = next(block.parameters(), None)
        if ref is not None:  # same device and dtype as the block it adapts
            sites.to(device=ref.device, dtype=ref.dtype)
        sites.attach(block)
        params += list(sites.parameters())
    return params


def remove_mona(model: nn.Module) -> nn.Module:
    """Take every Mona and its hooks off `model`, leaving the original module tree."""
    for module in list(model.modules()):
        sites = getattr(module, MonaSites.slot, None)
        if isinstance(sites, MonaSites):
            sites.detach(module)
    forget_added(model, "mona")
    return model
