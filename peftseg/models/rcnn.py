"""Mask R-CNN on a feature pyramid: the meta-architecture, RPN and ROI heads that the
`vitdet` and `swin` families share.

The graph is detectron2's model-zoo `configs/common/models/mask_rcnn_fpn.py` as ViTDet
configures it for every backbone it studies (ViT, Swin, MViTv2): 2-conv RPN head,
4conv1fc box head and 4-conv mask head, with the pyramid's norm in the head convs. Only
the sizes come from the config, so a CPU-sized preset and a published shape share one
code path. A family config inherits `MaskRCNNConfig` and builds only its backbone. detectron2 is
imported inside the builders: the registries import family modules at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from peftseg import checks
from peftseg.errors import UserError
from peftseg.models.family import INPUT_FORMATS

if TYPE_CHECKING:
    from detectron2.modeling import Backbone
    from detectron2.modeling.meta_arch import GeneralizedRCNN
    from detectron2.modeling.proposal_generator import RPN
    from detectron2.modeling.roi_heads import StandardROIHeads

# accounting groups of the parts built here, for the family maps
HEAD_PREFIXES = ("proposal_generator.", "roi_heads.")
# train.checkpoint_parts=[heads]: the RPN head (it takes the list of pyramid levels), the box
# head's convs and FCs, and the mask head's conv stack (`layers`: its forward also computes the
# loss from Instances, which a recomputation should not redo)
HEAD_CHECKPOINT = (r"proposal_generator\.rpn_head", r"roi_heads\.box_head", r"roi_heads\.mask_head:layers")
# the Linears of the box head and its predictor: LoRA target group `heads`
HEADS_LORA_TARGETS = r"roi_heads\.(box_head\.fc\d+|box_predictor\.(cls_score|bbox_pred))"
# the head convs as LoRA target groups (detectron2 Conv2d with the pyramid's norm and a ReLU
# inside: LoRA's update joins before them). The mask head's upsampling ConvTranspose2d and its
# 1x1 predictor are left out: peft's LoRA has no transposed-conv layer, and the predictor is a
# task head that method.train_task_layers trains whole.
HEAD_CONV_LORA_TARGETS = {
    "rpn_head_conv": r"proposal_generator\.rpn_head\.conv(?:\.conv\d+)?",  # one conv, or a Sequential conv0, conv1, …
    "box_head_conv": r"roi_heads\.box_head\.conv\d+",
    "mask_head_conv": r"roi_heads\.mask_head\.mask_fcn\d+",
}


@dataclass
class MaskRCNNConfig:
    input_format: str = "RGB"
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    # RPN; one anchor size per pyramid level (the max-pool level included)
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    anchor_aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_head_convs: int = 2
    rpn_batch_size_per_image: int = 256
    rpn_pre_nms_topk_train: int = 2000
    rpn_pre_nms_topk_test: int = 1000
    rpn_post_nms_topk_train: int = 1000
    rpn_post_nms_topk_test: int = 1000
    rpn_nms_thresh: float = 0.7
    # ROI heads
    roi_batch_size_per_image: int = 512
    roi_positive_fraction: float = 0.25
    box_pooler_resolution: int = 7
    box_head_convs: int = 4
    box_head_dim: int = 256  # channels of each box-head conv
    box_head_fcs: int = 1
    box_head_fc_dim: int = 1024
    mask_pooler_resolution: int = 14
    mask_head_convs: int = 4
    mask_head_dim: int = 256
    score_thresh_test: float = 0.05
    nms_thresh_test: float = 0.5
    detections_per_image: int = 100
    # the recipe's global gradient-norm clip (0: none, as detectron2's Mask R-CNN recipes);
    # train.clip_grad_norm overrides it when set
    clip_grad_norm: float = 0.0

    def __post_init__(self) -> None:
        for key in ("rpn_head_convs", "box_head_convs", "box_head_fcs", "mask_head_convs"):
            checks.integer(f"model.{key}", getattr(self, key), minimum=0)
        for key in ("rpn_batch_size_per_image", "rpn_pre_nms_topk_train", "rpn_pre_nms_topk_test",
                    "rpn_post_nms_topk_train", "rpn_post_nms_topk_test", "roi_batch_size_per_image",
                    "box_pooler_resolution", "box_head_dim", "box_head_fc_dim", "mask_pooler_resolution",
                    "mask_head_dim", "detections_per_image"):
            checks.integer(f"model.{key}", getattr(self, key), minimum=1)
        for key in ("rpn_nms_thresh", "roi_positive_fraction", "score_thresh_test", "nms_thresh_test"):
            checks.number(f"model.{key}", getattr(self, key), low=0, high=1)
        checks.number("model.clip_grad_norm", self.clip_grad_norm, low=0, why="0 disables clipping")
        checks.choice("model.input_format", self.input_format, INPUT_FORMATS)
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or not all(s > 0 for s in self.pixel_std):
            raise UserError(
                f"model.pixel_mean={list(self.pixel_mean)} and model.pixel_std={list(self.pixel_std)} "
                "must give 3 channel values each, with every std > 0."
            )


def _rpn(cfg: MaskRCNNConfig, levels: list[str], channels: int) -> RPN:
    from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
    from detectron2.modeling.box_regression import Box2BoxTransform
    from detectron2.modeling.matcher import Matcher
    from detectron2.modeling.proposal_generator import RPN, StandardRPNHead

    strides = [2 ** int(name[1:]) for name in levels]
    return RPN(
        in_features=levels,
        head=StandardRPNHead(
            in_channels=channels,
            num_anchors=len(cfg.anchor_aspect_ratios),
            conv_dims=[-1] * cfg.rpn_head_convs,
        ),
        anchor_generator=DefaultAnchorGenerator(
            sizes=[[s] for s in cfg.anchor_sizes],
            aspect_ratios=list(cfg.anchor_aspect_ratios),
            strides=strides,
            offset=0.0,
        ),
        anchor_matcher=Matcher(thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True),
        box2box_transform=Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0)),
        batch_size_per_image=cfg.rpn_batch_size_per_image,
        positive_fraction=0.5,
        pre_nms_topk=(cfg.rpn_pre_nms_topk_train, cfg.rpn_pre_nms_topk_test),
        post_nms_topk=(cfg.rpn_post_nms_topk_train, cfg.rpn_post_nms_topk_test),
        nms_thresh=cfg.rpn_nms_thresh,
    )


def _roi_heads(
    cfg: MaskRCNNConfig, levels: list[str], channels: int, norm: str, num_classes: int
) -> StandardROIHeads:
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.box_regression import Box2BoxTransform
    from detectron2.modeling.matcher import Matcher
    from detectron2.modeling.poolers import ROIPooler
    from detectron2.modeling.roi_heads import (
        FastRCNNConvFCHead,
        FastRCNNOutputLayers,
        MaskRCNNConvUpsampleHead,
        StandardROIHeads,
    )

    scales = tuple(1.0 / 2 ** int(name[1:]) for name in levels)
    box_res, mask_res = cfg.box_pooler_resolution, cfg.mask_pooler_resolution
    box_head = FastRCNNConvFCHead(
        input_shape=ShapeSpec(channels=channels, height=box_res, width=box_res),
        conv_dims=[cfg.box_head_dim] * cfg.box_head_convs,
        fc_dims=[cfg.box_head_fc_dim] * cfg.box_head_fcs,
        conv_norm=norm,
    )
    return StandardROIHeads(
        num_classes=num_classes,
        batch_size_per_image=cfg.roi_batch_size_per_image,
        positive_fraction=cfg.roi_positive_fraction,
        proposal_matcher=Matcher(thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=False),
        box_in_features=levels,
        box_pooler=ROIPooler(
            output_size=box_res, scales=scales, sampling_ratio=0, pooler_type="ROIAlignV2"
        ),
        box_head=box_head,
        box_predictor=FastRCNNOutputLayers(
            input_shape=box_head.output_shape,
            box2box_transform=Box2BoxTransform(weights=(10, 10, 5, 5)),
            num_classes=num_classes,
            test_score_thresh=cfg.score_thresh_test,
            test_nms_thresh=cfg.nms_thresh_test,
            test_topk_per_image=cfg.detections_per_image,
        ),
        mask_in_features=levels,
        mask_pooler=ROIPooler(
            output_size=mask_res, scales=scales, sampling_ratio=0, pooler_type="ROIAlignV2"
        ),
        mask_head=MaskRCNNConvUpsampleHead(
            input_shape=ShapeSpec(channels=channels, width=mask_res, height=mask_res),
            num_classes=num_classes,
            conv_dims=[cfg.mask_head_dim] * (cfg.mask_head_convs + 1),  # +1: the upsampling deconv
            conv_norm=norm,
        ),
    )


def build_mask_rcnn(cfg: MaskRCNNConfig, backbone: Backbone, num_classes: int, norm: str) -> GeneralizedRCNN:
    """Mask R-CNN around a pyramid backbone whose last level comes from LastLevelMaxPool.

    `norm` is the head convs' norm ("" for none); the families use their neck's.
    """
    from detectron2.modeling.meta_arch import GeneralizedRCNN

    shapes = backbone.output_shape()
    all_levels = list(shapes)  # p-levels incl. the max-pool one, in order
    roi_levels = all_levels[:-1]  # ROI pooling skips the max-pool level, as in the zoo config
    channels = shapes[all_levels[0]].channels
    return GeneralizedRCNN(
        backbone=backbone,
        proposal_generator=_rpn(cfg, all_levels, channels),
        roi_heads=_roi_heads(cfg, roi_levels, channels, norm, num_classes),
        pixel_mean=list(cfg.pixel_mean),
        pixel_std=list(cfg.pixel_std),
        input_format=cfg.input_format,
    )
