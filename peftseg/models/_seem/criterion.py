"""SEEM's training objective for the instance (mask) path, as the official `SetCriterion` and
`HungarianMatcher` (X-Decoder line, `modeling/modules/criterion.py` and `matcher.py`) compute it:

- matching per image and per prediction layer: cost = class_weight * (-softmax prob of the
  target class; the softmax runs over the classes and the background column) + mask_weight *
  BCE + dice_weight * dice, the mask costs on one shared set of uniformly random points;
- losses: softmax cross-entropy over classes + background with the `no_object` coefficient
  on the background column (`criterion.empty_weight`), and BCE + dice on PointRend's
  uncertainty-biased points of each matched mask, normalised by the number of targets;
- deep supervision: the same on every earlier prediction; names and weights as the official
  weight dict: loss_mask_{ce,bce,dice}_0 for the last layer, _1 for the one before, and so on.

The point sampling is detectron2's `projects.point_rend`; the assignment is scipy's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import get_uncertain_point_coords_with_randomness, point_sample
from detectron2.utils import comm
from scipy.optimize import linear_sum_assignment


class HungarianMatcher(nn.Module):
    def __init__(self, cost_class: float, cost_mask: float, cost_dice: float, num_points: int):
        super().__init__()
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        indices = []
        for b, t in enumerate(targets):
            labels = t["labels"]
            if len(labels) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            prob = outputs["pred_logits"][b].float().softmax(-1)
            cost_class = -prob[:, labels]
            out_mask = outputs["pred_masks"][b][:, None]
            tgt_mask = t["masks"].to(out_mask)[:, None]
            coords = torch.rand(1, self.num_points, 2, device=out_mask.device)
            tgt = point_sample(tgt_mask, coords.repeat(len(tgt_mask), 1, 1), align_corners=False).squeeze(1).float()
            out = point_sample(out_mask, coords.repeat(len(out_mask), 1, 1), align_corners=False).squeeze(1).float()
            pos = F.binary_cross_entropy_with_logits(out, torch.ones_like(out), reduction="none")
            neg = F.binary_cross_entropy_with_logits(out, torch.zeros_like(out), reduction="none")
            cost_bce = (pos @ tgt.T + neg @ (1 - tgt).T) / out.shape[1]
            p = out.sigmoid()
            cost_dice = 1 - (2 * p @ tgt.T + 1) / (p.sum(-1)[:, None] + tgt.sum(-1)[None, :] + 1)
            cost = self.cost_mask * cost_bce + self.cost_class * cost_class + self.cost_dice * cost_dice
            i, j = linear_sum_assignment(cost.cpu())
            indices.append((torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)))
        return indices


class SetCriterion(nn.Module):
    def __init__(self, num_classes: int, matcher: HungarianMatcher, weights: dict[str, float], no_object_weight: float,
                 num_points: int, oversample_ratio: float, importance_sample_ratio: float):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weights = weights  # ce / bce / dice
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight)  # an official checkpoint key too

    @staticmethod
    def _src_idx(indices):
        batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        return batch, torch.cat([src for src, _ in indices])

    def loss_labels(self, outputs, targets, indices) -> torch.Tensor:
        logits = outputs["pred_logits"].float()
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[self._src_idx(indices)] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        return F.cross_entropy(logits.transpose(1, 2), classes, self.empty_weight.to(logits))

    def loss_masks(self, outputs, targets, indices, num_masks: float) -> tuple[torch.Tensor, torch.Tensor]:
        src = outputs["pred_masks"][self._src_idx(indices)][:, None]
        if len(src) == 0:
            zero = outputs["pred_masks"].sum() * 0.0
            return zero, zero
        tgt = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, indices)]).to(src)[:, None]
        with torch.no_grad():
            coords = get_uncertain_point_coords_with_randomness(
                src, lambda logits: -logits.abs(), self.num_points, self.oversample_ratio,
                self.importance_sample_ratio).to(src.dtype)
            labels = point_sample(tgt, coords, align_corners=False).squeeze(1)
        logits = point_sample(src, coords, align_corners=False).squeeze(1)
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum() / num_masks
        p = logits.sigmoid()
        dice = 1 - (2 * (p * labels).sum(-1) + 1) / (p.sum(-1) + labels.sum(-1) + 1)
        return bce, dice.sum() / num_masks

    def layer_losses(self, outputs, targets, num_masks: float, suffix: int) -> dict[str, torch.Tensor]:
        indices = self.matcher(outputs, targets)
        bce, dice = self.loss_masks(outputs, targets, indices, num_masks)
        raw = {"ce": self.loss_labels(outputs, targets, indices), "bce": bce, "dice": dice}
        return {f"loss_mask_{k}_{suffix}": v * self.weights[k] for k, v in raw.items()}

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Weighted losses: `_0` for the last layer, `_i` for the i-th layer before it."""
        num = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=outputs["pred_logits"].device)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(num)
        num_masks = torch.clamp(num / comm.get_world_size(), min=1).item()
        losses = self.layer_losses(outputs, targets, num_masks, 0)
        for i, aux in enumerate(outputs.get("aux_outputs", [])[::-1]):
            losses.update(self.layer_losses(aux, targets, num_masks, i + 1))
        return losses
