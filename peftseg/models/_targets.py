"""Training targets shared by the query-based families (mask2former, maskdino, seem)."""

from __future__ import annotations

import torch
from detectron2.structures import BitMasks, Instances, PolygonMasks


def padded_gt_masks(inst: Instances, padded_hw: tuple[int, int], device) -> torch.Tensor:
    """The instances' ground-truth masks (polygons rasterised) as float32 (N, H, W), zero-padded
    like the image batch to `padded_hw`, on `device`."""
    h, w = inst.image_size
    masks = inst.gt_masks
    if isinstance(masks, PolygonMasks):
        masks = BitMasks.from_polygon_masks(masks, h, w)
    bits = masks.tensor if isinstance(masks, BitMasks) else torch.as_tensor(masks)
    padded = torch.zeros((len(bits), *padded_hw), dtype=torch.float32, device=device)
    padded[:, : bits.shape[1], : bits.shape[2]] = bits.to(device, torch.float32)
    return padded
