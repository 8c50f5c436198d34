"""FocalNet (Yang et al., NeurIPS 2022) as a detectron2 Backbone: SEEM's vision encoder.

Two official variants, one module tree each (the official key names):
- `focal_dw` (SEEM Focal-T v1): a depth-wise 3x3 conv before the modulation and before the MLP
  (`dw1`, `dw2`), post-LN blocks (norm after each residual add), stem conv padding 3;
- `focal` (SEEM Focal-L v1): no depth-wise convs, post-LN inside the branches (norm on the
  modulation's and the MLP's output before layer scale), stem conv padding 2.
Both: overlapped conv patch embedding, focal modulation (`modulation.f/h/proj`, one depth-wise
conv + GELU per focal level, global context gate, scaling modulator), layer scale
(`gamma_1/2`), one LayerNorm per output stage (`norm0..3`) and outputs res2..res5.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from timm.layers import DropPath


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class FocalModulation(nn.Module):
    def __init__(self, dim: int, focal_level: int, focal_window: int, focal_factor: int = 2,
                 scaling_modulator: bool = True):
        super().__init__()
        self.focal_level = focal_level
        self.scaling_modulator = scaling_modulator
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1)  # query, context, one gate per level + global
        self.h = nn.Conv2d(dim, dim, kernel_size=1)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        self.focal_layers = nn.ModuleList()
        for k in range(focal_level):
            kernel = focal_factor * k + focal_window
            self.focal_layers.append(nn.Sequential(
                nn.Conv2d(dim, dim, kernel, groups=dim, padding=kernel // 2, bias=False), nn.GELU()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x H x W x C -> B x H x W x C."""
        c = x.shape[-1]
        x = self.f(x).permute(0, 3, 1, 2).contiguous()
        q, ctx, gates = torch.split(x, (c, c, self.focal_level + 1), 1)
        ctx_all = 0
        for level in range(self.focal_level):
            ctx = self.focal_layers[level](ctx)
            ctx_all = ctx_all + ctx * gates[:, level:level + 1]
        ctx_global = self.act(ctx.mean(2, keepdim=True).mean(3, keepdim=True))
        ctx_all = ctx_all + ctx_global * gates[:, self.focal_level:]
        if self.scaling_modulator:
            ctx_all = ctx_all / (self.focal_level + 1)
        out = (q * self.h(ctx_all)).permute(0, 2, 3, 1).contiguous()
        return self.proj(out)


class FocalModulationBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, drop_path: float, focal_level: int, focal_window: int,
                 depthwise: bool, layerscale_value: float = 1e-4):
        super().__init__()
        self.depthwise = depthwise
        if depthwise:
            self.dw1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = FocalModulation(dim, focal_level, focal_window)
        if depthwise:
            self.dw2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(layerscale_value * torch.ones(dim))
        self.gamma_2 = nn.Parameter(layerscale_value * torch.ones(dim))

    @staticmethod
    def _dw(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """x + conv(x) on B x H x W x C tokens."""
        y = x.permute(0, 3, 1, 2).contiguous()
        return (y + conv(y)).permute(0, 2, 3, 1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x H x W x C (the official code carries B x HW x C plus H, W attributes)."""
        if self.depthwise:  # focal_dw: post-LN after each residual add
            x = self._dw(self.dw1, x)
            x = self.norm1(x + self.drop_path(self.gamma_1 * self.modulation(x)))
            x = self._dw(self.dw2, x)
            return self.norm2(x + self.drop_path(self.gamma_2 * self.mlp(x)))
        # focal: post-LN inside each branch
        x = x + self.drop_path(self.gamma_1 * self.norm1(self.modulation(x)))
        return x + self.drop_path(self.gamma_2 * self.norm2(self.mlp(x)))


class PatchEmbed(nn.Module):
    """Overlapped conv embedding: 7x7 stride 4 for the stem, 3x3 stride 2 between stages."""

    def __init__(self, in_chans: int, embed_dim: int, is_stem: bool, stem_padding: int):
        super().__init__()
        kernel, stride, padding = (7, 4, stem_padding) if is_stem else (3, 2, 1)
        self.stride = 4 if is_stem else 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x C x H x W -> B x H' x W' x D (padded to a multiple of the patch size first)."""
        h, w = x.shape[-2:]
        p = self.stride
        if w % p:
            x = F.pad(x, (0, p - w % p))
        if h % p:
            x = F.pad(x, (0, 0, 0, p - h % p))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class BasicLayer(nn.Module):
    def __init__(self, dim: int, depth: int, mlp_ratio: float, drop_path: list[float], focal_level: int,
                 focal_window: int, depthwise: bool, downsample: bool, stem_padding: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            FocalModulationBlock(dim, mlp_ratio, drop_path[i], focal_level, focal_window, depthwise)
            for i in range(depth))
        self.downsample = PatchEmbed(dim, 2 * dim, False, stem_padding) if downsample else None


class D2FocalNet(Backbone):
    """`backbone`: FocalNet stages with a LayerNorm per output, outputs res2..res5."""

    def __init__(self, *, embed_dim: int, depths: list[int], focal_levels: list[int], focal_windows: list[int],
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.3, depthwise: bool = True):
        super().__init__()
        stem_padding = 3 if depthwise else 2
        self.patch_embed = PatchEmbed(3, embed_dim, True, stem_padding)
        total = sum(depths)  # stochastic depth rising linearly over all blocks (torch.linspace(0, rate, n))
        dpr = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        self.num_features = [embed_dim * 2**i for i in range(len(depths))]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            self.layers.append(BasicLayer(
                self.num_features[i], depth, mlp_ratio, dpr[sum(depths[:i]):sum(depths[:i + 1])],
                focal_levels[i], focal_windows[i], depthwise, downsample=i < len(depths) - 1,
                stem_padding=stem_padding))
        for i, width in enumerate(self.num_features):
            self.add_module(f"norm{i}", nn.LayerNorm(width))
        self._out_features = [f"res{i + 2}" for i in range(len(depths))]
        self._out_feature_channels = {f"res{i + 2}": c for i, c in enumerate(self.num_features)}
        self._out_feature_strides = {f"res{i + 2}": 2 ** (i + 2) for i in range(len(depths))}
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def size_divisibility(self) -> int:
        return 32

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
                for n in self._out_features}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.patch_embed(x)
        outs = {}
        for i, layer in enumerate(self.layers):
            for block in layer.blocks:
                x = block(x)
            outs[f"res{i + 2}"] = getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous()
            if layer.downsample is not None:
                # the official (B, HW, C) -> (B, C, H, W) view: the same values as a permute,
                # but these strides make CPU convolution pick the official kernel (a permute
                # of a batch-1 tensor differs by a few 1e-6, enough to reorder the top-k)
                b, h, w, c = x.shape
                x = layer.downsample(x.reshape(b, h * w, c).transpose(1, 2).view(b, c, h, w))
        return outs
