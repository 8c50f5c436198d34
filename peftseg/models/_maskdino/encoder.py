"""Mask DINO's pixel decoder (`sem_seg_head.pixel_decoder`): a multi-scale deformable
attention encoder over the chosen backbone levels plus extra stride-2 levels, then a stride-4
mask-feature map from the highest-resolution backbone level and the upsampled encoder output.

Level order follows the official `feature_order`: "low2high" puts the backbone levels first,
finest first, and the extra (coarser) levels after them; "high2low" puts the extra levels
first and the backbone levels coarsest first. Parity with released checkpoints depends on it
(the level embedding and the sampling offsets are per level).

Padding masks: the official encoder builds all-false masks whenever it is called the way its
head calls it (no mask), so no position is ever masked; this implementation has none.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec, get_norm

from peftseg.models._maskdino.deform_attn import MSDeformAttn


def sine_position_embedding(x: torch.Tensor, num_pos_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised 2-D sine embedding of a (B, C, H, W) map: (B, 2*num_pos_feats, H, W),
    y features first. Normalised by the last cumulative index (DETR's, not Deformable DETR's
    half-pixel variant), with scale 2*pi."""
    b, _, h, w = x.shape
    eps, scale = 1e-6, 2 * math.pi
    y_embed = torch.arange(1, h + 1, dtype=torch.float32, device=x.device).view(1, h, 1).expand(b, h, w)
    x_embed = torch.arange(1, w + 1, dtype=torch.float32, device=x.device).view(1, 1, w).expand(b, h, w)
    y_embed = y_embed / (h + eps) * scale
    x_embed = x_embed / (w + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=x.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class EncoderLayer(nn.Module):
    """Post-norm: deformable self-attention -> add & norm -> FFN -> add & norm."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes):
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, reference_points, src, spatial_shapes)))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableEncoder(nn.Module):
    def __init__(self, layer_args: dict, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**layer_args) for _ in range(num_layers))

    @staticmethod
    def reference_points(spatial_shapes: list[tuple[int, int]], batch: int, device) -> torch.Tensor:
        """Pixel centres of every level, normalised to 0..1: (B, S, levels, 2) as (x, y)."""
        refs = []
        for h, w in spatial_shapes:
            ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
            xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            refs.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
        ref = torch.cat(refs, 0)
        return ref[None, :, None, :].expand(batch, -1, len(spatial_shapes), -1)

    def forward(self, src, spatial_shapes, pos):
        ref = self.reference_points(spatial_shapes, src.shape[0], src.device)
        for layer in self.layers:
            src = layer(src, pos, ref, spatial_shapes)
        return src


class EncoderOnly(nn.Module):
    """`pixel_decoder.transformer`: level embeddings + the encoder layers."""

    def __init__(self, d_model, nhead, num_layers, dim_feedforward, dropout, num_levels, n_points):
        super().__init__()
        self.encoder = DeformableEncoder(
            dict(d_model=d_model, d_ffn=dim_feedforward, dropout=dropout, n_levels=num_levels,
                 n_heads=nhead, n_points=n_points), num_layers)
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.encoder.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[torch.Tensor], pos_embeds: list[torch.Tensor]):
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[i].view(1, 1, -1)
                         for i, p in enumerate(pos_embeds)], 1)
        return self.encoder(flat, shapes, pos), shapes


class MaskDINOEncoder(nn.Module):
    def __init__(self, input_shape: dict[str, ShapeSpec], *, encoder_in_features: list[str],
                 total_num_feature_levels: int, feature_order: str, conv_dim: int, mask_dim: int,
                 norm: str, enc_layers: int, dim_feedforward: int, nheads: int, n_points: int,
                 dropout: float, common_stride: int = 4):
        super().__init__()
        by_stride = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in by_stride]
        self.feature_order = feature_order
        # the encoder's backbone levels, finest first (input_proj is built in this order)
        fine_first = [k for k in self.in_features if k in encoder_in_features]
        self.encoder_features = fine_first
        channels = [input_shape[k].channels for k in fine_first]
        self.num_backbone_levels = len(fine_first)
        self.total_num_feature_levels = total_num_feature_levels
        self.conv_dim = conv_dim

        def proj(cin, **kw):
            return nn.Sequential(nn.Conv2d(cin, conv_dim, **kw), nn.GroupNorm(32, conv_dim))

        # official index order: low2high indexes input_proj finest first; high2low coarsest first
        order = channels if feature_order == "low2high" else channels[::-1]
        projs = [proj(c, kernel_size=1) for c in order]
        cin = max(channels)  # the extra levels start from the coarsest backbone level
        for _ in range(total_num_feature_levels - self.num_backbone_levels):
            projs.append(proj(cin, kernel_size=3, stride=2, padding=1))
            cin = conv_dim
        self.input_proj = nn.ModuleList(projs)
        for p in self.input_proj:
            nn.init.xavier_uniform_(p[0].weight, gain=1)
            nn.init.zeros_(p[0].bias)

        self.transformer = EncoderOnly(conv_dim, nheads, enc_layers, dim_feedforward, dropout,
                                       total_num_feature_levels, n_points)
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)  # c2_xavier_fill
        nn.init.zeros_(self.mask_features.bias)

        # FPN-style levels from the backbone's finer maps down to the common stride
        finest_encoder_stride = input_shape[fine_first[0]].stride
        self.num_fpn_levels = max(int(math.log2(finest_encoder_stride) - math.log2(common_stride)), 1)
        self.lateral_convs, self.output_convs = [], []
        bias = norm == ""
        for i, name in enumerate(self.in_features[: self.num_fpn_levels]):
            lateral = Conv2d(input_shape[name].channels, conv_dim, kernel_size=1, bias=bias,
                             norm=get_norm(norm, conv_dim))
            output = Conv2d(conv_dim, conv_dim, kernel_size=3, padding=1, bias=bias,
                            norm=get_norm(norm, conv_dim), activation=F.relu)
            for conv in (lateral, output):
                nn.init.kaiming_uniform_(conv.weight, a=1)
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
            # official names: adapter_N (lateral) and layer_N (output), finest first
            self.add_module(f"adapter_{i + 1}", lateral)
            self.add_module(f"layer_{i + 1}", output)
            self.lateral_convs.append(lateral)
            self.output_convs.append(output)
        # coarse-to-fine order for the top-down pass (plain lists: registered above)
        self.lateral_convs = self.lateral_convs[::-1]
        self.output_convs = self.output_convs[::-1]

    def forward_features(self, features: dict[str, torch.Tensor]):
        """-> (mask features at the common stride, list of the encoder's levels as maps)."""
        srcs, pos = [], []
        for i, name in enumerate(self.encoder_features if self.feature_order == "low2high"
                                 else self.encoder_features[::-1]):
            x = features[name].float()
            srcs.append(self.input_proj[i](x))
            pos.append(sine_position_embedding(x, self.conv_dim // 2))
        extra, extra_pos = [], []
        x = features[self.encoder_features[-1]].float()
        for i in range(self.num_backbone_levels, self.total_num_feature_levels):
            x = self.input_proj[i](x)
            extra.append(x)
            extra_pos.append(sine_position_embedding(x, self.conv_dim // 2))
        # the official code reverses the extra levels in both orders (coarsest extra first)
        if self.feature_order == "low2high":
            srcs, pos = srcs + extra[::-1], pos + extra_pos[::-1]
        else:
            srcs, pos = extra[::-1] + srcs, extra_pos[::-1] + pos
        memory, shapes = self.transformer(srcs, pos)
        b = memory.shape[0]
        maps = [m.transpose(1, 2).reshape(b, -1, h, w)
                for m, (h, w) in zip(memory.split([h * w for h, w in shapes], 1), shapes)]
        finest = maps[0] if self.feature_order == "low2high" else maps[-1]
        y = finest
        for idx, name in enumerate(self.in_features[: self.num_fpn_levels][::-1]):
            lateral = self.lateral_convs[idx](features[name].float())
            y = lateral + F.interpolate(finest, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            y = self.output_convs[idx](y)
        return self.mask_features(y), maps
