"""Boxes around masks, written so that tracing (ONNX, TorchScript) keeps them a function of the masks.

detectron2's `BitMasks.get_bounding_boxes` and torchvision's `masks_to_boxes` loop over the masks in
Python and build each box from Python numbers (`torch.as_tensor([x[0], y[0], …])`, `if len(x) > 0`):
a tracer records those numbers as constants, so an exported model returns the boxes of the image it
was traced with, whatever image it is given. Here every step is a tensor op over all masks at once.
"""

from __future__ import annotations

import torch


def mask_boxes(masks: torch.Tensor, exclusive_end: bool = True) -> torch.Tensor:
    """(N, H, W) masks (non-zero = inside) -> (N, 4) float32 boxes x1, y1, x2, y2 in pixel indices:
    the first column and row inside, and one past the last (`exclusive_end`, as detectron2's
    `BitMasks.get_bounding_boxes`) or the last itself (as torchvision's `masks_to_boxes`).
    An empty mask gets the box (0, 0, 0, 0), as detectron2 gives it."""
    _, h, w = masks.shape
    inside = masks != 0
    cols, rows = inside.any(dim=1), inside.any(dim=2)  # (N, W), (N, H)
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    end = 1 if exclusive_end else 0
    # first/last index inside: the min/max over the indices, the outside ones replaced by a
    # value that never wins (w or h for the min, 0 for the max)
    x1 = torch.where(cols, xs, w).amin(dim=1)
    y1 = torch.where(rows, ys, h).amin(dim=1)
    x2 = torch.where(cols, xs + end, 0).amax(dim=1)
    y2 = torch.where(rows, ys + end, 0).amax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).to(torch.float32)
    return torch.where(cols.any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))
