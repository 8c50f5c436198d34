"""The Mask DINO meta-architecture: detectron2 batched_inputs in, a loss dict (training) or
Instances (inference) out, served by detectron2's trainer and COCOEvaluator like any other
family. Attribute names are the official ones (backbone, sem_seg_head.pixel_decoder,
sem_seg_head.predictor, criterion)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import SwinTransformer
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import Boxes, ImageList, Instances

from peftseg.models._targets import padded_gt_masks
from peftseg.models._maskdino.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh


class D2Swin(SwinTransformer):
    """detectron2's SwinTransformer (the same module tree as the official D2SwinTransformer,
    hence the same checkpoint keys) with the official output names res2..res5."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._out_features = [f"res{i + 2}" for i in self.out_indices]
        self._out_feature_channels = {f"res{i + 2}": self.embed_dim * 2**i for i in self.out_indices}
        self._out_feature_strides = {f"res{i + 2}": 2 ** (i + 2) for i in self.out_indices}

    def forward(self, x):
        return {f"res{int(k[1:]) + 2}": v for k, v in super().forward(x).items()}


class MaskDINOHead(nn.Module):
    """`sem_seg_head`: the pixel decoder and the transformer decoder."""

    def __init__(self, pixel_decoder: nn.Module, predictor: nn.Module, num_classes: int):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor
        self.num_classes = num_classes

    def forward(self, features, targets=None):
        mask_features, maps = self.pixel_decoder.forward_features(features)
        return self.predictor(maps, mask_features, targets=targets)


# Not in detectron2's global META_ARCH_REGISTRY: the family's builder constructs it directly,
# and a global entry would clash with the official package's own "MaskDINO" in a process that
# imports both (e.g. to compare outputs against the official model).
class MaskDINO(nn.Module):
    def __init__(self, *, backbone, sem_seg_head: MaskDINOHead, criterion: nn.Module, pixel_mean,
                 pixel_std, size_divisibility: int, test_topk_per_image: int, input_format: str = "RGB"):
        super().__init__()
        self.input_format = input_format  # what the data loaders decode images to
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.size_divisibility = size_divisibility
        self.test_topk_per_image = test_topk_per_image
        # non-persistent, as in the official model: config values, not learned weights
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def prepare_targets(self, batched_inputs, padded_hw):
        targets = []
        for x in batched_inputs:
            inst = x["instances"].to(self.device)
            h, w = inst.image_size
            padded = padded_gt_masks(inst, padded_hw, self.device)
            # boxes normalised by the unpadded image size, as the official targets are
            scale = torch.as_tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            targets.append({
                "labels": inst.gt_classes.to(torch.int64),
                "masks": padded,
                "boxes": box_xyxy_to_cxcywh(inst.gt_boxes.tensor.float()) / scale,
            })
        return targets

    def forward(self, batched_inputs: list[dict]):
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.size_divisibility)
        features = self.backbone(images.tensor)
        if self.training:
            targets = self.prepare_targets(batched_inputs, tuple(images.tensor.shape[-2:]))
            outputs, dn = self.sem_seg_head(features, targets=targets)
            return self.criterion(outputs, targets, dn)
        outputs, _ = self.sem_seg_head(features)
        return self.postprocess(outputs, batched_inputs, images)

    def postprocess(self, outputs: dict, batched_inputs, images: ImageList) -> list[dict]:
        padded_hw = images.tensor.shape[-2:]
        masks = F.interpolate(outputs["pred_masks"], size=padded_hw, mode="bilinear", align_corners=False)
        results = []
        for logits, mask, box, x, size in zip(outputs["pred_logits"], masks, outputs["pred_boxes"],
                                               batched_inputs, images.image_sizes):
            height, width = x.get("height", size[0]), x.get("width", size[1])
            mask = sem_seg_postprocess(mask, size, height, width)
            # boxes are relative to the padded input: scale to padded size in output pixels
            scale_h, scale_w = padded_hw[0] / size[0] * height, padded_hw[1] / size[1] * width
            box = box_cxcywh_to_xyxy(box.to(mask)) * torch.tensor([scale_w, scale_h, scale_w, scale_h]).to(mask)
            results.append({"instances": self.instance_inference(logits.to(mask), mask, box)})
        return results

    def instance_inference(self, logits: torch.Tensor, mask_logits: torch.Tensor, boxes: torch.Tensor) -> Instances:
        """Top-k over queries x classes of the sigmoid scores; score x mean mask probability
        inside the predicted mask; boxes from the box head."""
        num_classes = logits.shape[-1]
        k = min(self.test_topk_per_image, logits.numel())
        scores, flat = logits.sigmoid().flatten().topk(k, sorted=False)
        query = torch.div(flat, num_classes, rounding_mode="floor")
        mask_logits = mask_logits[query]
        result = Instances(tuple(mask_logits.shape[-2:]))
        binary = (mask_logits > 0).float()
        result.pred_masks = binary
        result.pred_boxes = Boxes(boxes[query])
        mask_scores = (mask_logits.sigmoid().flatten(1) * binary.flatten(1)).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        result.scores = scores * mask_scores
        result.pred_classes = flat % num_classes
        return result


def build_backbone(cfg) -> nn.Module:
    if cfg.backbone == "swin":
        return D2Swin(
            pretrain_img_size=cfg.pretrain_img_size, patch_size=4, embed_dim=cfg.embed_dim,
            depths=tuple(cfg.depths), num_heads=tuple(cfg.num_heads), window_size=cfg.window_size,
            mlp_ratio=cfg.mlp_ratio, qkv_bias=True, drop_path_rate=cfg.drop_path_rate,
            out_indices=(0, 1, 2, 3),
        )
    # ResNet through detectron2's builder, with the official Base-COCO settings
    from detectron2.config import get_cfg
    from detectron2.modeling import build_resnet_backbone

    d2 = get_cfg()
    d2.MODEL.BACKBONE.FREEZE_AT = 0
    d2.MODEL.RESNETS.DEPTH = cfg.resnet_depth
    d2.MODEL.RESNETS.STEM_OUT_CHANNELS = 64
    d2.MODEL.RESNETS.STRIDE_IN_1X1 = False
    d2.MODEL.RESNETS.NORM = "FrozenBN"
    d2.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    d2.MODEL.RESNETS.RES2_OUT_CHANNELS = 256 if cfg.resnet_depth >= 50 else 64
    return build_resnet_backbone(d2, ShapeSpec(channels=3))


def build_maskdino(cfg, num_classes: int) -> MaskDINO:
    from peftseg.models._maskdino.criterion import HungarianMatcher, SetCriterion
    from peftseg.models._maskdino.decoder import MaskDINODecoder
    from peftseg.models._maskdino.encoder import MaskDINOEncoder

    backbone = build_backbone(cfg)
    shapes = backbone.output_shape()
    pixel_decoder = MaskDINOEncoder(
        shapes, encoder_in_features=list(cfg.encoder_in_features),
        total_num_feature_levels=cfg.total_num_feature_levels, feature_order=cfg.feature_order,
        conv_dim=cfg.conv_dim, mask_dim=cfg.mask_dim, norm="GN", enc_layers=cfg.enc_layers,
        dim_feedforward=cfg.enc_dim_feedforward, nheads=cfg.nheads, n_points=cfg.n_points,
        dropout=cfg.dropout,
    )
    predictor = MaskDINODecoder(
        num_classes=num_classes, hidden_dim=cfg.hidden_dim, num_queries=cfg.num_queries,
        nheads=cfg.nheads, dim_feedforward=cfg.dim_feedforward, dec_layers=cfg.dec_layers,
        mask_dim=cfg.mask_dim, num_feature_levels=cfg.total_num_feature_levels, n_points=cfg.n_points,
        dropout=cfg.dropout, dn=cfg.dn, dn_num=cfg.dn_num, noise_scale=cfg.dn_noise_scale,
        initialize_box_type=cfg.initialize_box_type,
    )
    matcher = HungarianMatcher(cfg.cost_class_weight, cfg.cost_mask_weight, cfg.cost_dice_weight,
                               cfg.cost_box_weight, cfg.cost_giou_weight, cfg.train_num_points)
    weights = {"loss_ce": cfg.class_weight, "loss_mask": cfg.mask_weight, "loss_dice": cfg.dice_weight,
               "loss_bbox": cfg.box_weight, "loss_giou": cfg.giou_weight}
    criterion = SetCriterion(num_classes, matcher, weights, cfg.no_object_weight, cfg.train_num_points,
                             cfg.oversample_ratio, cfg.importance_sample_ratio, cfg.dn)
    return MaskDINO(
        backbone=backbone, sem_seg_head=MaskDINOHead(pixel_decoder, predictor, num_classes),
        criterion=criterion, pixel_mean=list(cfg.pixel_mean), pixel_std=list(cfg.pixel_std),
        size_divisibility=cfg.size_divisibility, test_topk_per_image=cfg.test_topk_per_image,
        input_format=cfg.input_format,
    )
