"""SEEM's decoder (`sem_seg_head.predictor`, official `seem_v1`), its instance-segmentation path:
learnable object queries; per layer masked cross-attention to one of three feature levels
(coarsest first, in turn), self-attention, FFN (all post-norm, as in Mask2Former); after the
queries and after every layer a prediction: class logits in the language space (`decoder_norm(q)
@ class_embed`, compared with the cached class text embeddings) and mask logits (`mask_embed(q)`
dotted with the mask features), whose thresholded upsampling is the next layer's attention mask.

The interactive (spatial) and grounding paths of SEEM are not run here, but their parameters
(`mask_sptial_embed`, `spatial_embed`, `spatial_featured`, `pn_indicator`) are kept under the
official names so that released checkpoints load with no unexpected key; no method trains them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftseg.models._seem.language import LanguageEncoder
from peftseg.models._seem.pixel_decoder import PositionEmbeddingSine

# parameters of the interactive/grounding path: loaded, never used by the instance path
UNUSED_PREFIXES = ("mask_sptial_embed.", "spatial_embed.", "spatial_featured.", "pn_indicator.")


class SelfAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(0.0)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt, tgt_mask, query_pos):
        q = k = tgt + query_pos
        return self.norm(tgt + self.dropout(self.self_attn(q, k, value=tgt, attn_mask=tgt_mask)[0]))


class CrossAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(0.0)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt, memory, memory_mask, pos, query_pos):
        out = self.multihead_attn(query=tgt + query_pos, key=memory + pos, value=memory, attn_mask=memory_mask)[0]
        return self.norm(tgt + self.dropout(out))


class FFNLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(0.0)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt):
        return self.norm(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + dims, dims + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


class SEEMDecoder(nn.Module):
    NUM_LEVELS = 3

    def __init__(self, lang_encoder: LanguageEncoder, *, hidden_dim: int, dim_proj: int, num_queries: int,
                 nheads: int, dim_feedforward: int, dec_layers: int, mask_dim: int, spatial_memories: int = 32):
        """`dec_layers` is the official DEC_LAYERS: the transformer layers plus the prediction
        from the learnable queries (one loss each)."""
        super().__init__()
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2)
        self.num_heads = nheads
        self.num_layers = dec_layers - 1
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads) for _ in range(self.num_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads) for _ in range(self.num_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward) for _ in range(self.num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(self.NUM_LEVELS, hidden_dim)
        # the pixel decoder's levels are hidden_dim wide (checked in the config), so the
        # official input projections are identities, with no parameters
        self.input_proj = nn.ModuleList(nn.Sequential() for _ in range(self.NUM_LEVELS))
        self.lang_encoder = lang_encoder
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.class_embed = nn.Parameter(torch.empty(hidden_dim, dim_proj))
        nn.init.trunc_normal_(self.class_embed, std=0.02)
        # the spatial (interactive) path's parameters: see UNUSED_PREFIXES
        self.mask_sptial_embed = nn.ParameterList(
            nn.Parameter(nn.init.trunc_normal_(torch.empty(hidden_dim, hidden_dim), std=0.02)) for _ in range(3))
        self.spatial_embed = nn.Embedding(spatial_memories, hidden_dim)
        self.spatial_featured = nn.Embedding(spatial_memories, hidden_dim)
        self.pn_indicator = nn.Embedding(2, hidden_dim)

    def forward(self, x: list[torch.Tensor], mask_features: torch.Tensor) -> dict:
        """x: the three feature levels, coarsest first. Returns the last layer's `pred_logits`
        (B x Q x C+1) and `pred_masks` (B x Q x H/4 x W/4), and `aux_outputs` (the earlier
        predictions, the learnable queries' first)."""
        src, pos, sizes = [], [], []
        for i in range(self.NUM_LEVELS):
            sizes.append(x[i].shape[-2:])
            pos.append(self.pe_layer(x[i]).flatten(2).permute(2, 0, 1))
            src.append((self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
        bs = src[0].shape[1]
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
        # the official object-only self-attention mask: nothing masked, passed as the official
        # code passes it (one all-False mask per head)
        self_attn_mask = torch.zeros((bs * self.num_heads, self.num_queries, self.num_queries),
                                     dtype=torch.bool, device=output.device)
        predictions = []
        logits, masks, attn_mask = self.forward_prediction_heads(output, mask_features, sizes[0])
        predictions.append((logits, masks))
        for i in range(self.num_layers):
            level = i % self.NUM_LEVELS
            # a query whose mask covers nothing attends everywhere instead (Mask2Former's rule)
            attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
            output = self.transformer_cross_attention_layers[i](output, src[level], attn_mask, pos[level], query_embed)
            output = self.transformer_self_attention_layers[i](output, self_attn_mask, query_embed)
            output = self.transformer_ffn_layers[i](output)
            logits, masks, attn_mask = self.forward_prediction_heads(
                output, mask_features, sizes[(i + 1) % self.NUM_LEVELS])
            predictions.append((logits, masks))
        return {
            "pred_logits": predictions[-1][0],
            "pred_masks": predictions[-1][1],
            "aux_outputs": [{"pred_logits": a, "pred_masks": b} for a, b in predictions[:-1]],
        }

    def forward_prediction_heads(self, output, mask_features, attn_mask_size):
        decoder_output = self.decoder_norm(output).transpose(0, 1)
        logits = self.lang_encoder.compute_similarity(decoder_output @ self.class_embed)
        mask_embed = self.mask_embed(decoder_output)
        masks = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        attn_mask = F.interpolate(masks, size=attn_mask_size, mode="bilinear", align_corners=False)
        attn_mask = (attn_mask.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1) < 0.5)
        return logits, masks, attn_mask.detach()
