"""Multi-scale deformable attention (Deformable DETR) with torch's grid_sample.

The official project ships a compiled CUDA kernel and a PyTorch fallback that computes the
same thing; this is a PyTorch implementation (no build step, runs on any device). The four
projections keep the official names (`sampling_offsets`, `attention_weights`, `value_proj`,
`output_proj`), which are also the LoRA target names of this family. `output_proj` is the
last nn.Linear registered, so adapter code that reads the site's width finds d_model.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sample_levels(value: torch.Tensor, shapes: list[tuple[int, int]], locations: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """Weighted bilinear samples of every level.

    value: (B, S, heads, d_head) with S = sum(h*w); locations: (B, Q, heads, levels, points, 2)
    in [0, 1] (x, y) of each level; weights: (B, Q, heads, levels, points), summing to 1 over
    levels x points. Returns (B, Q, heads * d_head).
    """
    b, _, heads, d_head = value.shape
    _, q, _, levels, points, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = locations * 2 - 1  # grid_sample's coordinates: -1..1 across the map's pixel edges
    out = value.new_zeros(b * heads, d_head, q)
    for lvl, (h, w) in enumerate(shapes):
        # (B, h*w, heads, d) -> (B*heads, d, h, w): every head samples its own channels
        v = per_level[lvl].permute(0, 2, 3, 1).reshape(b * heads, d_head, h, w)
        g = grids[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(b * heads, q, points, 2)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        wl = weights[:, :, :, lvl].permute(0, 2, 1, 3).reshape(b * heads, 1, q, points)
        out = out + (sampled * wl).sum(-1)  # (B*heads, d, Q)
    return out.view(b, heads * d_head, q).transpose(1, 2)


class MSDeformAttn(nn.Module):
    # model.deform_attn_impl (auto | triton | pytorch; models/_msda.py), set after build
    impl: str = "pytorch"

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Deformable DETR's init: offsets start on a ring of directions, one per head, the
        # k-th point k steps out; uniform attention over levels x points
        nn.init.zeros_(self.sampling_offsets.weight)
        angle = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        ring = torch.stack([angle.cos(), angle.sin()], -1)
        ring = ring / ring.abs().max(-1, keepdim=True)[0]
        ring = ring.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        ring = ring * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(ring.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value_in: torch.Tensor,
                spatial_shapes: list[tuple[int, int]]) -> torch.Tensor:
        """query (B, Q, d); reference_points (B, Q, levels, 2) as (x, y) or (B, Q, levels, 4)
        as (cx, cy, w, h), normalised; value_in (B, S, d) with the levels' maps flattened."""
        b, q, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_in).view(b, value_in.shape[1], heads, self.d_model // heads)
        offsets = self.sampling_offsets(query).view(b, q, heads, levels, points, 2)
        weights = self.attention_weights(query).view(b, q, heads, levels * points)
        weights = weights.softmax(-1).view(b, q, heads, levels, points)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by its (w, h)
            wh = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
            locations = reference_points[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
        else:
            # offsets are in units of half the reference box, spread over the points
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5)
        from peftseg.models._msda import ms_deform_attn

        return self.output_proj(ms_deform_attn(self.impl, sample_levels, value, spatial_shapes, locations, weights))
