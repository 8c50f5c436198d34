"""Mask DINO's training objective: Hungarian matching with class (focal), box (L1 + GIoU)
and mask (point-sampled BCE + dice) costs; focal class loss, L1 + GIoU box losses and
point-sampled BCE + dice mask losses on the last layer, every earlier layer (`_<i>`), the
encoder's selected queries (`_interm`) and the denoising queries (`_dn`, `_dn_<i>`), each
weighted by the official weight of its kind.

The point sampling (PointRend's uncertainty-biased sampling) is detectron2's
`projects.point_rend`; the assignment is scipy's linear_sum_assignment.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import get_uncertain_point_coords_with_randomness, point_sample
from detectron2.utils import comm
from scipy.optimize import linear_sum_assignment

from peftseg.models._maskdino.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0


def _mask_costs(out_mask: torch.Tensor, tgt_mask: torch.Tensor, num_points: int):
    """BCE and dice cost of every (query, target) pair on one shared set of random points."""
    coords = torch.rand(1, num_points, 2, device=out_mask.device)
    tgt = point_sample(tgt_mask[:, None], coords.repeat(len(tgt_mask), 1, 1), align_corners=False).squeeze(1)
    out = point_sample(out_mask[:, None], coords.repeat(len(out_mask), 1, 1), align_corners=False).squeeze(1)
    out, tgt = out.float(), tgt.float()
    pos = F.binary_cross_entropy_with_logits(out, torch.ones_like(out), reduction="none")
    neg = F.binary_cross_entropy_with_logits(out, torch.zeros_like(out), reduction="none")
    bce = (pos @ tgt.T + neg @ (1 - tgt).T) / out.shape[1]
    prob = out.sigmoid()
    dice = 1 - (2 * prob @ tgt.T + 1) / (prob.sum(-1)[:, None] + tgt.sum(-1)[None, :] + 1)
    return bce, dice


class HungarianMatcher(nn.Module):
    def __init__(self, cost_class: float, cost_mask: float, cost_dice: float, cost_box: float,
                 cost_giou: float, num_points: int):
        super().__init__()
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.cost_box, self.cost_giou, self.num_points = cost_box, cost_giou, num_points

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]):
        indices = []
        for b, t in enumerate(targets):
            labels = t["labels"]
            if len(labels) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            boxes = outputs["pred_boxes"][b].float()
            prob = outputs["pred_logits"][b].float().sigmoid()
            neg = (1 - FOCAL_ALPHA) * prob**FOCAL_GAMMA * -(1 - prob + 1e-8).log()
            pos = FOCAL_ALPHA * (1 - prob) ** FOCAL_GAMMA * -(prob + 1e-8).log()
            cost = self.cost_class * (pos[:, labels] - neg[:, labels])
            cost = cost + self.cost_box * torch.cdist(boxes, t["boxes"], p=1)
            cost = cost - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(t["boxes"]))
            bce, dice = _mask_costs(outputs["pred_masks"][b], t["masks"].to(outputs["pred_masks"]), self.num_points)
            cost = cost + self.cost_mask * bce + self.cost_dice * dice
            i, j = linear_sum_assignment(cost.cpu())
            indices.append((torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)))
        return indices


class SetCriterion(nn.Module):
    def __init__(self, num_classes: int, matcher: HungarianMatcher, weights: dict[str, float],
                 no_object_weight: float, num_points: int, oversample_ratio: float,
                 importance_sample_ratio: float, dn: str):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weights = weights  # loss_ce / loss_mask / loss_dice / loss_bbox / loss_giou
        self.num_points, self.oversample_ratio = num_points, oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.dn = dn
        # the official checkpoints carry this buffer (a softmax-CE leftover the focal loss does
        # not read); kept so that they load with no unexpected key
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight)

    def weight_of(self, key: str) -> float:
        root = "_".join(key.split("_")[:2])  # loss_ce_dn_3 -> loss_ce
        return self.weights[root]

    # ----- single losses
    @staticmethod
    def _src_idx(indices):
        batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        return batch, torch.cat([src for src, _ in indices])

    def loss_labels(self, outputs, targets, indices, num):
        logits = outputs["pred_logits"]
        b, q, c = logits.shape
        target = torch.zeros(b, q, c + 1, dtype=logits.dtype, device=logits.device)
        classes = torch.full((b, q), c, dtype=torch.int64, device=logits.device)
        classes[self._src_idx(indices)] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target.scatter_(2, classes.unsqueeze(-1), 1)
        target = target[..., :-1]
        prob = logits.sigmoid()
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p_t = prob * target + (1 - prob) * (1 - target)
        loss = ce * (1 - p_t) ** FOCAL_GAMMA
        loss = (FOCAL_ALPHA * target + (1 - FOCAL_ALPHA) * (1 - target)) * loss
        # the official normalisation: mean over queries, sum, / num boxes, x num queries
        return {"loss_ce": loss.mean(1).sum() / num * q}

    def loss_boxes(self, outputs, targets, indices, num):
        src = outputs["pred_boxes"][self._src_idx(indices)]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], 0)
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        return {"loss_bbox": F.l1_loss(src, tgt, reduction="none").sum() / num,
                "loss_giou": (1 - giou).sum() / num}

    def loss_masks(self, outputs, targets, indices, num):
        src = outputs["pred_masks"][self._src_idx(indices)][:, None]
        tgt = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, indices)], 0).to(src)[:, None]
        with torch.no_grad():
            # points biased to where the prediction is uncertain (|logit| small), PointRend-style
            coords = get_uncertain_point_coords_with_randomness(
                src, lambda logits: -logits.abs(), self.num_points, self.oversample_ratio,
                self.importance_sample_ratio)
            labels = point_sample(tgt, coords, align_corners=False).squeeze(1)
        logits = point_sample(src, coords, align_corners=False).squeeze(1)
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum() / num
        prob = logits.sigmoid()
        dice = 1 - (2 * (prob * labels).sum(-1) + 1) / (prob.sum(-1) + labels.sum(-1) + 1)
        return {"loss_mask": bce, "loss_dice": dice.sum() / num}

    def all_losses(self, outputs, targets, indices, num) -> dict:
        out = {}
        out.update(self.loss_labels(outputs, targets, indices, num))
        out.update(self.loss_masks(outputs, targets, indices, num))
        out.update(self.loss_boxes(outputs, targets, indices, num))
        return out

    # ----- the whole objective
    def forward(self, outputs: dict, targets: list[dict], dn: dict | None) -> dict:
        device = outputs["pred_logits"].device
        num = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(num)
        num = max(num.item() / comm.get_world_size(), 1.0)

        losses = {}
        dn_indices = None
        if dn is not None:
            dn_indices = []
            for t in targets:
                n = len(t["labels"])
                j = torch.arange(n, dtype=torch.int64).repeat(dn["groups"])
                i = (torch.arange(dn["groups"], dtype=torch.int64)[:, None] * dn["single_pad"]
                     + torch.arange(n, dtype=torch.int64)[None]).flatten()
                dn_indices.append((i, j))

        def add(out, indices, suffix, norm):
            losses.update({f"{k}{suffix}": v for k, v in self.all_losses(out, targets, indices, norm).items()})

        def add_dn(out, suffix):
            if dn_indices is not None:
                add(out, dn_indices, suffix, num * dn["groups"])
            elif self.dn != "no":
                # same keys every step, so logged metrics stay aligned when a batch has no GT
                for k in ("loss_ce", "loss_mask", "loss_dice", "loss_bbox", "loss_giou"):
                    losses[f"{k}{suffix}"] = outputs["pred_logits"].sum() * 0.0

        last = {k: v for k, v in outputs.items() if k not in ("aux_outputs", "interm_outputs")}
        add(last, self.matcher(last, targets), "", num)
        add_dn(dn["outputs"] if dn is not None else None, "_dn")
        for i, aux in enumerate(outputs["aux_outputs"]):
            add(aux, self.matcher(aux, targets), f"_{i}", num)
            add_dn(dn["outputs"]["aux_outputs"][i] if dn is not None else None, f"_dn_{i}")
        interm = outputs["interm_outputs"]
        add(interm, self.matcher(interm, targets), "_interm", num)
        return {k: v * self.weight_of(k) for k, v in losses.items()}
