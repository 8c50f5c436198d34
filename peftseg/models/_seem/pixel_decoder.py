"""SEEM's `transformer_encoder_fpn` pixel decoder (`sem_seg_head.pixel_decoder`): an FPN over
res2..res5 whose coarsest level first goes through a DETR-style transformer encoder.

Official names: `adapter_i` (lateral 1x1 convs with GN), `layer_i` (3x3 output convs with GN +
ReLU), `input_proj`, `transformer.encoder.layers.N` (self_attn / linear1 / linear2 / norm1 /
norm2, post-norm), `mask_features`. It returns the mask features (stride 4) and the first three
FPN outputs, coarsest first, which the decoder cross-attends to in turn.
"""

from __future__ import annotations

import math

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec, get_norm


class PositionEmbeddingSine(nn.Module):
    """DETR's normalised sine position embedding of a feature map (no padding mask: the
    official SEEM code passes none)."""

    def __init__(self, num_pos_feats: int, temperature: int = 10000):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = 2 * math.pi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        not_mask = torch.ones((x.shape[0], x.shape[2], x.shape[3]), device=x.device, dtype=torch.bool)
        y_embed = not_mask.cumsum(1, dtype=x.dtype)
        x_embed = not_mask.cumsum(2, dtype=x.dtype)
        eps = 1e-6
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=x.dtype, device=x.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class TransformerEncoderLayer(nn.Module):
    """Post-norm DETR encoder layer: q = k = src + pos, v = src."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = k = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, value=src)[0]))
        src2 = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


class TransformerEncoder(nn.Module):
    def __init__(self, layers: int, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout)
                                    for _ in range(layers))

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, pos)
        return src


class TransformerEncoderOnly(nn.Module):
    def __init__(self, layers: int, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.encoder = TransformerEncoder(layers, d_model, nhead, dim_feedforward, dropout)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        b, c, h, w = src.shape
        memory = self.encoder(src.flatten(2).permute(2, 0, 1), pos.flatten(2).permute(2, 0, 1))
        return memory.permute(1, 2, 0).reshape(b, c, h, w)


class TransformerEncoderPixelDecoder(nn.Module):
    NUM_LEVELS = 3  # feature levels handed to the decoder ("we always use 3 scales")

    def __init__(self, input_shape: dict[str, ShapeSpec], *, conv_dim: int, mask_dim: int, enc_layers: int,
                 nheads: int, dim_feedforward: int, dropout: float = 0.0, norm: str = "GN"):
        super().__init__()
        shapes = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in shapes]  # res2 .. res5
        channels = [v.channels for _, v in shapes]
        lateral_convs, output_convs = [], []
        for idx, in_channels in enumerate(channels):
            if idx == len(channels) - 1:
                # the coarsest level goes through input_proj + the encoder, then this conv
                conv = Conv2d(conv_dim, conv_dim, 3, padding=1, bias=False, norm=get_norm(norm, conv_dim),
                              activation=F.relu)
                weight_init.c2_xavier_fill(conv)
                self.add_module(f"layer_{idx + 1}", conv)
                lateral_convs.append(None)
                output_convs.append(conv)
                continue
            lateral = Conv2d(in_channels, conv_dim, 1, bias=False, norm=get_norm(norm, conv_dim))
            output = Conv2d(conv_dim, conv_dim, 3, padding=1, bias=False, norm=get_norm(norm, conv_dim),
                            activation=F.relu)
            weight_init.c2_xavier_fill(lateral)
            weight_init.c2_xavier_fill(output)
            self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)
            lateral_convs.append(lateral)
            output_convs.append(output)
        # coarse to fine, as the top-down pass runs (plain lists: the modules are registered above)
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]
        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, 3, padding=1)
        weight_init.c2_xavier_fill(self.mask_features)
        self.input_proj = Conv2d(channels[-1], conv_dim, 1)
        weight_init.c2_xavier_fill(self.input_proj)
        self.transformer = TransformerEncoderOnly(enc_layers, conv_dim, nheads, dim_feedforward, dropout)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2)

    def forward_features(self, features: dict[str, torch.Tensor]):
        """(mask features, [the first three FPN outputs, coarsest first])."""
        multi_scale = []
        y = None
        for idx, name in enumerate(self.in_features[::-1]):
            x = features[name]
            lateral, output = self.lateral_convs[idx], self.output_convs[idx]
            if lateral is None:
                y = output(self.transformer(self.input_proj(x), self.pe_layer(x)))
            else:
                cur = lateral(x)
                y = output(cur + F.interpolate(y, size=cur.shape[-2:], mode="nearest"))
            if len(multi_scale) < self.NUM_LEVELS:
                multi_scale.append(y)
        return self.mask_features(y), multi_scale
