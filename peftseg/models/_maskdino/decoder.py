"""Mask DINO's transformer decoder (`sem_seg_head.predictor`): two-stage query selection
from the encoder's tokens, mask-enhanced anchor boxes, a DINO decoder (self-attention,
deformable cross-attention at the anchor boxes, FFN; iterative box refinement), and the
class / box / mask heads, plus the denoising queries of training (DN-DETR / DINO `dn`).

Module names and sharing follow the official code: one box MLP is shared by every layer and
reachable as `_bbox_embed`, `bbox_embed.<i>` and `decoder.bbox_embed.<i>`; `decoder_norm`
is also `decoder.norm`. Checkpoints list each alias, so they load key for key.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftseg.models._maskdino import box_ops
from peftseg.models._maskdino.deform_attn import MSDeformAttn
from peftseg.models._mask_boxes import mask_boxes


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def encoder_proposals(memory: torch.Tensor, spatial_shapes: list[tuple[int, int]]):
    """One proposal per encoder token: its cell centre and a square whose side doubles per
    level (0.05 at level 0), in logit space; tokens near the border (any coordinate outside
    0.01..0.99) get +inf boxes and zeroed features so that they are never selected well."""
    b = memory.shape[0]
    proposals = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        ys = (torch.arange(h, dtype=torch.float32, device=memory.device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=memory.device) + 0.5) / w
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        centre = torch.stack([gx, gy], -1).reshape(-1, 2)
        side = torch.full_like(centre, 0.05 * (2.0 ** lvl))
        proposals.append(torch.cat([centre, side], -1))
    proposals = torch.cat(proposals, 0)[None].expand(b, -1, -1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals)).masked_fill(~valid, float("inf"))
    return memory.masked_fill(~valid, 0.0), proposals


def box_sine_embedding(boxes: torch.Tensor, num_pos_feats: int) -> torch.Tensor:
    """Sine embedding of (..., 4) boxes (cx, cy, w, h in 0..1) -> (..., 4*num_pos_feats), in the
    order y, x, w, h. The official code fixes num_pos_feats at 128 (d_model 256); here it is
    d_model / 2, which is the same for 256 and lets narrow CPU presets exist."""
    scale = 2 * math.pi
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=boxes.device)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)

    def embed(coord):
        p = (coord * scale)[..., None] / dim_t
        return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2)

    return torch.cat([embed(boxes[..., 1]), embed(boxes[..., 0]), embed(boxes[..., 2]), embed(boxes[..., 3])], -1)


class SelfAttention(nn.Module):
    """nn.MultiheadAttention's parameters (in_proj_weight, in_proj_bias, out_proj) and maths,
    sequence-first, with `out_proj` called as a module: torch's own module reads
    out_proj.weight directly, which would silently bypass a LoRA wrapper on it."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query, key, value, attn_mask=None):
        """(L, B, d) each; attn_mask (L, L) bool, True = may not attend (torch's convention)."""
        length, b, d = query.shape
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)

        def heads(x, w, bias):
            return F.linear(x, w, bias).view(x.shape[0], b, self.n_heads, d // self.n_heads).permute(1, 2, 0, 3)

        out = F.scaled_dot_product_attention(
            heads(query, wq, bq), heads(key, wk, bk), heads(value, wv, bv),
            attn_mask=None if attn_mask is None else ~attn_mask,
            dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.permute(2, 0, 1, 3).reshape(length, b, d))


class DecoderLayer(nn.Module):
    """Post-norm: self-attention -> deformable cross-attention -> FFN (sequence-first)."""

    def __init__(self, d_model, d_ffn, dropout, n_levels, n_heads, n_points):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = SelfAttention(d_model, n_heads, dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, self_attn_mask=None):
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, k, tgt, attn_mask=self_attn_mask)))
        cross = self.cross_attn((tgt + query_pos).transpose(0, 1), reference_points.transpose(0, 1),
                                memory, spatial_shapes).transpose(0, 1)
        tgt = self.norm1(tgt + self.dropout1(cross))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class TransformerDecoder(nn.Module):
    def __init__(self, layer_args: dict, num_layers: int, norm: nn.LayerNorm, d_model: int):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(**layer_args) for _ in range(num_layers))
        self.norm = norm
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.d_model = d_model
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        self.bbox_embed: nn.ModuleList | None = None  # the predictor's shared box MLPs

    def forward(self, tgt, memory, refpoints_unsigmoid, spatial_shapes, tgt_mask=None):
        """tgt (Q, B, d); memory (B, S, d); refpoints (Q, B, 4) in logit space.
        -> per layer: normed outputs (B, Q, d); reference boxes (B, Q, 4): the input ones and
        each layer's refined ones (the latter with gradient, as the official code keeps them)."""
        output = tgt
        reference = refpoints_unsigmoid.sigmoid()
        references, intermediate = [reference], []
        levels = len(spatial_shapes)
        for layer_id, layer in enumerate(self.layers):
            ref_input = reference[:, :, None].expand(-1, -1, levels, -1)
            query_pos = self.ref_point_head(box_sine_embedding(reference, self.d_model // 2))
            output = layer(output, query_pos, ref_input, memory, spatial_shapes, tgt_mask)
            new_reference = (self.bbox_embed[layer_id](output) + inverse_sigmoid(reference)).sigmoid()
            reference = new_reference.detach()
            references.append(new_reference)
            intermediate.append(self.norm(output))
        return [h.transpose(0, 1) for h in intermediate], [r.transpose(0, 1) for r in references]


class MaskDINODecoder(nn.Module):
    def __init__(self, *, num_classes: int, hidden_dim: int, num_queries: int, nheads: int,
                 dim_feedforward: int, dec_layers: int, mask_dim: int, num_feature_levels: int,
                 n_points: int, dropout: float, dn: str, dn_num: int, noise_scale: float,
                 initialize_box_type: str):
        super().__init__()
        self.num_classes, self.hidden_dim, self.num_queries = num_classes, hidden_dim, num_queries
        self.num_layers, self.num_feature_levels = dec_layers, num_feature_levels
        self.dn, self.dn_num, self.noise_scale = dn, dn_num, noise_scale
        self.initialize_box_type = initialize_box_type
        # two-stage query selection (the only mode of the published Mask DINO models)
        self.enc_output = nn.Linear(hidden_dim, hidden_dim)
        self.enc_output_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        self.label_enc = nn.Embedding(num_classes, hidden_dim)  # denoising label queries
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.decoder = TransformerDecoder(
            dict(d_model=hidden_dim, d_ffn=dim_feedforward, dropout=dropout, n_levels=num_feature_levels,
                 n_heads=nheads, n_points=n_points), dec_layers, self.decoder_norm, hidden_dim)
        self._bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.zeros_(self._bbox_embed.layers[-1].weight)
        nn.init.zeros_(self._bbox_embed.layers[-1].bias)
        self.bbox_embed = nn.ModuleList([self._bbox_embed] * dec_layers)
        self.decoder.bbox_embed = self.bbox_embed
        # the focal loss's prior: every class starts at probability 0.01 (DINO's init)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))

    # ----- heads
    def prediction_heads(self, output: torch.Tensor, mask_features: torch.Tensor, pred_mask: bool = True):
        """output (B, Q, d) -> class logits (B, Q, C) and mask logits (B, Q, H, W) or None."""
        out = self.decoder_norm(output)
        logits = self.class_embed(out)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(out), mask_features) if pred_mask else None
        return logits, masks

    def masks_to_anchor_boxes(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """Mask-enhanced anchors: the boxes around the initial masks (logit space)."""
        b, q, h, w = mask_logits.shape
        flat = mask_logits.detach().flatten(0, 1) > 0
        # the official code calls BitMasks.get_bounding_boxes (bitmask) or torchvision's masks_to_boxes
        # (mask2box, no +1 at the end); the same boxes by tensor ops, which an exported graph keeps
        # (those loops would be frozen into the anchors of the image the export traced)
        boxes = mask_boxes(flat, exclusive_end=self.initialize_box_type == "bitmask")
        scale = torch.as_tensor([w, h, w, h], dtype=torch.float32, device=mask_logits.device)
        boxes = box_ops.box_xyxy_to_cxcywh(boxes) / scale
        return inverse_sigmoid(boxes.reshape(b, q, 4))

    # ----- denoising queries (training only)
    def prepare_dn(self, targets: list[dict], batch: int, device):
        """Noised copies of the ground truth (labels flipped with prob noise_scale/2, boxes
        jittered by up to noise_scale of their size) in `groups` groups of `single_pad`
        queries; the attention mask hides the groups from each other and from the matching
        queries. None when no image has a ground-truth instance."""
        known_num = [int(len(t["labels"])) for t in targets]
        single_pad = max(known_num) if known_num else 0
        groups = self.dn_num // single_pad if single_pad > 0 else 0
        if groups == 0:
            return None
        labels = torch.cat([t["labels"] for t in targets]).repeat(groups)
        boxes = torch.cat([t["boxes"] for t in targets]).repeat(groups, 1)
        batch_idx = torch.cat([torch.full((n,), i, dtype=torch.long, device=device)
                               for i, n in enumerate(known_num)]).repeat(groups)
        noisy_labels, noisy_boxes = labels.clone(), boxes.clone()
        if self.noise_scale > 0:
            flip = torch.rand(labels.shape, device=device) < self.noise_scale * 0.5
            noisy_labels[flip] = torch.randint_like(noisy_labels[flip], 0, self.num_classes)
            diff = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], -1)
            noisy_boxes = (boxes + (torch.rand_like(boxes) * 2 - 1) * diff * self.noise_scale).clamp(0.0, 1.0)
        pad_size = single_pad * groups
        in_group = torch.cat([torch.arange(n, device=device) for n in known_num])
        slot = torch.cat([in_group + single_pad * g for g in range(groups)])
        query_label = torch.zeros(batch, pad_size, self.hidden_dim, device=device)
        query_box = torch.zeros(batch, pad_size, 4, device=device)
        query_label[batch_idx, slot] = self.label_enc(noisy_labels.long())
        query_box[batch_idx, slot] = inverse_sigmoid(noisy_boxes)
        size = pad_size + self.num_queries
        attn_mask = torch.zeros(size, size, dtype=torch.bool, device=device)
        attn_mask[pad_size:, :pad_size] = True  # matching queries do not see the answers
        for g in range(groups):
            lo, hi = single_pad * g, single_pad * (g + 1)
            attn_mask[lo:hi, :lo] = True
            attn_mask[lo:hi, hi:pad_size] = True
        meta = {"pad_size": pad_size, "groups": groups, "single_pad": single_pad}
        return query_label, query_box, attn_mask, meta

    def forward(self, x: list[torch.Tensor], mask_features: torch.Tensor, targets=None):
        """x: the encoder's levels in its own order; the decoder reads them reversed, as the
        official code does. Returns (outputs dict, denoising dict or None)."""
        levels = x[::-1]
        spatial_shapes = [tuple(f.shape[-2:]) for f in levels]
        memory = torch.cat([f.flatten(2).transpose(1, 2) for f in levels], 1)
        bs = memory.shape[0]

        # two-stage: score every encoder token, keep the top num_queries as queries + anchors
        out_memory, proposals = encoder_proposals(memory, spatial_shapes)
        out_memory = self.enc_output_norm(self.enc_output(out_memory))
        enc_class = self.class_embed(out_memory)
        enc_coord = self._bbox_embed(out_memory) + proposals
        topk = torch.topk(enc_class.max(-1)[0], self.num_queries, dim=1)[1]
        ref_undetach = torch.gather(enc_coord, 1, topk.unsqueeze(-1).repeat(1, 1, 4))
        tgt_undetach = torch.gather(out_memory, 1, topk.unsqueeze(-1).repeat(1, 1, self.hidden_dim))
        interm_class, interm_mask = self.prediction_heads(tgt_undetach, mask_features)
        interm = {"pred_logits": interm_class, "pred_boxes": ref_undetach.sigmoid(), "pred_masks": interm_mask}
        tgt = tgt_undetach.detach()
        refpoint = ref_undetach.detach()
        if self.initialize_box_type != "no":
            refpoint = self.masks_to_anchor_boxes(interm_mask)

        attn_mask, dn_meta = None, None
        if self.training and self.dn != "no" and targets is not None:
            prepared = self.prepare_dn(targets, bs, memory.device)
            if prepared is not None:
                dn_label, dn_box, attn_mask, dn_meta = prepared
                tgt = torch.cat([dn_label, tgt], 1)
                refpoint = torch.cat([dn_box, refpoint], 1)

        classes, masks = [], []
        # the prediction from the selected queries themselves ("initial_pred")
        c, m = self.prediction_heads(tgt, mask_features, self.training)
        classes.append(c)
        masks.append(m)
        hs, references = self.decoder(tgt.transpose(0, 1), memory, refpoint.transpose(0, 1),
                                      spatial_shapes, attn_mask)
        for i, h in enumerate(hs):
            c, m = self.prediction_heads(h, mask_features, self.training or i == len(hs) - 1)
            classes.append(c)
            masks.append(m)
        boxes = [refpoint.sigmoid()]
        for ref, box_mlp, h in zip(references[:-1], self.bbox_embed, hs):
            boxes.append((box_mlp(h) + inverse_sigmoid(ref)).sigmoid())

        dn_out = None
        if dn_meta is not None:
            pad = dn_meta["pad_size"]
            known = [{"pred_logits": c[:, :pad], "pred_masks": m[:, :pad], "pred_boxes": b[:, :pad]}
                     for c, m, b in zip(classes, masks, boxes)]
            classes = [c[:, pad:] for c in classes]
            masks = [m[:, pad:] for m in masks]
            boxes = [b[:, pad:] for b in boxes]
            dn_out = dict(dn_meta, outputs={**known[-1], "aux_outputs": known[:-1]})
        elif self.training:
            # keep label_enc in the graph (DDP wants a gradient for every trainable parameter)
            classes[-1] = classes[-1] + 0.0 * self.label_enc.weight.sum()

        out = {
            "pred_logits": classes[-1], "pred_masks": masks[-1], "pred_boxes": boxes[-1],
            "aux_outputs": [{"pred_logits": c, "pred_masks": m, "pred_boxes": b}
                            for c, m, b in zip(classes[:-1], masks[:-1], boxes[:-1])],
            "interm_outputs": interm,
        }
        return out, dn_out
