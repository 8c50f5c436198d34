"""Family `vitdet`: detectron2 ViT + SimpleFeaturePyramid + Mask R-CNN.

The graph mirrors detectron2's model-zoo LazyConfig
`configs/common/models/mask_rcnn_vitdet.py` (itself `mask_rcnn_fpn.py` with the ViT
backbone, LN in neck and heads, 2-conv RPN head, 4conv1fc box head). Every module is
detectron2's own class built from constructor kwargs; only the sizes come from the
config, so one code path serves the CPU-sized preset and the published ViT-B shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch.nn as nn
from detectron2.layers import ShapeSpec
from detectron2.modeling import SimpleFeaturePyramid, ViT
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import (
    FastRCNNConvFCHead,
    FastRCNNOutputLayers,
    MaskRCNNConvUpsampleHead,
    StandardROIHeads,
)
from omegaconf import MISSING

from peftseg.errors import UserError
from peftseg.models.family import FamilyMap

_BLOCK = r"backbone\.net\.blocks\.\d+"

FAMILY = FamilyMap(
    name="vitdet",
    groups={
        "backbone": ("backbone.net.",),
        "neck": ("backbone.",),
        "heads": ("proposal_generator.", "roi_heads."),
    },
    adapter_sites={"attn": _BLOCK + r"\.attn", "mlp": _BLOCK + r"\.mlp"},
    lora_targets={
        "attn_qkv": _BLOCK + r"\.attn\.qkv",
        "attn_proj": _BLOCK + r"\.attn\.proj",
        "mlp": _BLOCK + r"\.mlp\.fc[12]",
        "heads": r"roi_heads\.(box_head\.fc\d+|box_predictor\.(cls_score|bbox_pred))",
    },
)

# the scale factors SimpleFeaturePyramid implements
_SUPPORTED_SCALES = (4.0, 2.0, 1.0, 0.5)


@dataclass
class VitDetConfig:
    family: str = "vitdet"
    name: str = MISSING
    weights: str = ""  # path or URL; MAE backbone-only files need "?matching_heuristics=True"
    # ViT input size: batches are padded to this square (ViTDet's square_pad), so the data
    # mapper must resize every image's long side to at most this
    image_size: int = 1024
    input_format: str = "RGB"
    # ViT
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    window_size: int = 14
    window_block_indexes: list[int] = field(default_factory=lambda: [0, 1, 3, 4, 6, 7, 9, 10])
    use_rel_pos: bool = True
    drop_path_rate: float = 0.1
    pretrain_img_size: int = 224  # size of the absolute position table in pretrained weights
    # SimpleFeaturePyramid
    out_channels: int = 256
    scale_factors: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])
    norm: str = "LN"  # neck and box/mask head convs
    # RPN; one anchor size per pyramid level (scale factors + the max-pool level)
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
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])


def _check(cfg: VitDetConfig) -> None:
    """Fail with a fix on shapes detectron2 would reject with a bare assertion."""
    if cfg.embed_dim % cfg.num_heads:
        raise UserError(
            f"model.embed_dim={cfg.embed_dim} is not divisible by model.num_heads="
            f"{cfg.num_heads}; pick values where embed_dim is a multiple of num_heads."
        )
    bad = [s for s in cfg.scale_factors if float(s) not in _SUPPORTED_SCALES]
    if bad or not cfg.scale_factors:
        raise UserError(
            f"model.scale_factors={list(cfg.scale_factors)} is not supported: "
            f"SimpleFeaturePyramid builds levels only for scale factors {list(_SUPPORTED_SCALES)}; "
            "list one or more of them, largest first and halving each step (e.g. [2.0, 1.0, 0.5])."
        )
    strides = [int(cfg.patch_size / s) for s in cfg.scale_factors]
    if any(b != 2 * a for a, b in zip(strides, strides[1:])):
        raise UserError(
            f"model.scale_factors={list(cfg.scale_factors)} gives strides {strides}, which must "
            "double from one level to the next; list the factors largest first without gaps "
            "(e.g. [4.0, 2.0, 1.0, 0.5])."
        )
    levels = len(strides) + 1  # + LastLevelMaxPool
    if len(cfg.anchor_sizes) != levels:
        raise UserError(
            f"model.anchor_sizes has {len(cfg.anchor_sizes)} entries but the feature pyramid has "
            f"{levels} levels ({len(strides)} scale factors + the max-pool level); give one "
            "anchor size per level, e.g. 8x each level's stride."
        )
    if cfg.image_size % cfg.patch_size:
        raise UserError(
            f"model.image_size={cfg.image_size} is not a multiple of model.patch_size="
            f"{cfg.patch_size}; choose an image size the patch size divides."
        )


def _backbone(cfg: VitDetConfig) -> SimpleFeaturePyramid:
    net = ViT(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias,
        drop_path_rate=cfg.drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),  # as published; MAE weights expect it
        window_size=cfg.window_size,
        window_block_indexes=list(cfg.window_block_indexes),
        residual_block_indexes=[],
        use_rel_pos=cfg.use_rel_pos,
        pretrain_img_size=cfg.pretrain_img_size,
        out_feature="last_feat",
    )
    return SimpleFeaturePyramid(
        net=net,
        in_feature="last_feat",
        out_channels=cfg.out_channels,
        scale_factors=tuple(float(s) for s in cfg.scale_factors),
        top_block=LastLevelMaxPool(),
        norm=cfg.norm,
        square_pad=cfg.image_size,
    )


def _rpn(cfg: VitDetConfig, levels: list[str]) -> RPN:
    strides = [2 ** int(name[1:]) for name in levels]
    return RPN(
        in_features=levels,
        head=StandardRPNHead(
            in_channels=cfg.out_channels,
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


def _roi_heads(cfg: VitDetConfig, levels: list[str], num_classes: int) -> StandardROIHeads:
    scales = tuple(1.0 / 2 ** int(name[1:]) for name in levels)
    ch = cfg.out_channels
    box_res, mask_res = cfg.box_pooler_resolution, cfg.mask_pooler_resolution
    box_head = FastRCNNConvFCHead(
        input_shape=ShapeSpec(channels=ch, height=box_res, width=box_res),
        conv_dims=[cfg.box_head_dim] * cfg.box_head_convs,
        fc_dims=[cfg.box_head_fc_dim] * cfg.box_head_fcs,
        conv_norm=cfg.norm,
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
            input_shape=ShapeSpec(channels=ch, width=mask_res, height=mask_res),
            num_classes=num_classes,
            conv_dims=[cfg.mask_head_dim] * (cfg.mask_head_convs + 1),  # +1: the upsampling deconv
            conv_norm=cfg.norm,
        ),
    )


def build(cfg: VitDetConfig, num_classes: int) -> GeneralizedRCNN:
    _check(cfg)
    backbone = _backbone(cfg)
    all_levels = list(backbone.output_shape())  # p-levels incl. the max-pool one, in order
    roi_levels = all_levels[:-1]  # ROI pooling skips the max-pool level, as in the zoo config
    return GeneralizedRCNN(
        backbone=backbone,
        proposal_generator=_rpn(cfg, all_levels),
        roi_heads=_roi_heads(cfg, roi_levels, num_classes),
        pixel_mean=list(cfg.pixel_mean),
        pixel_std=list(cfg.pixel_std),
        input_format=cfg.input_format,
    )

