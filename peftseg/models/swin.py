"""Family `swin`: detectron2 SwinTransformer + FPN + Mask R-CNN.

The graph is the one detectron2's ViTDet project uses for its Swin baselines
(`projects/ViTDet/configs/COCO/*_swin_*`): `SwinTransformer` as the FPN's bottom-up
network, LN in the FPN and the head convs, batches padded to a square, and the same Mask
R-CNN heads as the vitdet family (`rcnn.build_mask_rcnn`; ViTDet's Swin configs are
cascade, this family keeps the plain Mask R-CNN of the published Swin results).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from detectron2.modeling import FPN, SwinTransformer
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.meta_arch import GeneralizedRCNN
from omegaconf import MISSING

from peftseg.errors import UserError
from peftseg.models.family import FamilyMap
from peftseg.models.rcnn import HEAD_PREFIXES, HEADS_LORA_TARGETS, MaskRCNNConfig, build_mask_rcnn

_BLOCK = r"backbone\.bottom_up\.layers\.\d+\.blocks\.\d+"

FAMILY = FamilyMap(
    name="swin",
    groups={
        "backbone": ("backbone.bottom_up.",),
        "neck": ("backbone.",),
        "heads": HEAD_PREFIXES,
    },
    # WindowAttention returns the windows' tokens (B·windows, window², C): a token-wise
    # adapter sees every token once, only grouped by window
    adapter_sites={"attn": _BLOCK + r"\.attn", "mlp": _BLOCK + r"\.mlp"},
    lora_targets={
        "attn_qkv": _BLOCK + r"\.attn\.qkv",
        "attn_proj": _BLOCK + r"\.attn\.proj",
        "mlp": _BLOCK + r"\.mlp\.fc[12]",
        "heads": HEADS_LORA_TARGETS,
    },
)

# detectron2's SwinTransformer names its stage outputs with strides 2**(i+2), true only for
# 4-px patches, and LastLevelMaxPool reads p5, so the stage count and patch size are fixed
_STAGES = 4


@dataclass
class SwinConfig(MaskRCNNConfig):  # + RPN/ROI-head sizes, pixel mean/std
    family: str = "swin"
    name: str = MISSING
    # path or URL: a detectron2 checkpoint, or an official Swin state dict (mapped onto
    # backbone.bottom_up; see weights.py)
    weights: str = ""
    # batches are padded to this square (FPN square_pad, as ViTDet's Swin configs), so the
    # data mapper resizes every image's long side to at most this
    image_size: int = 1024
    # SwinTransformer (patch size 4)
    embed_dim: int = 96
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.2
    # FPN (p2..p5 from the four stages, + p6 from max-pool)
    out_channels: int = 256
    norm: str = "LN"  # FPN and box/mask head convs


def check_swin_stages(embed_dim: int, depths, num_heads, why_four: str) -> None:
    """Four stages whose head counts divide each stage's width (embed_dim·2^stage); shared
    with the mask2former family, whose backbone is a Swin too."""
    if len(depths) != _STAGES or len(num_heads) != _STAGES:
        raise UserError(
            f"model.depths={list(depths)} and model.num_heads={list(num_heads)} must "
            f"each list {_STAGES} stages: {why_four}; change the numbers per stage, not "
            "their count (e.g. depths [2, 2, 6, 2], num_heads [3, 6, 12, 24])."
        )
    for i, heads in enumerate(num_heads):
        dim = embed_dim * 2**i
        if heads < 1 or dim % heads:
            raise UserError(
                f"stage {i} of model.embed_dim={embed_dim} is {dim} channels wide, which "
                f"model.num_heads[{i}]={heads} does not divide; Swin doubles the width per "
                "stage, so pick heads that divide embed_dim·2^stage (e.g. [3, 6, 12, 24] for 96)."
            )


def _check(cfg: SwinConfig) -> None:
    """Fail with a fix on shapes detectron2 would reject with a bare assertion, or not at all."""
    check_swin_stages(cfg.embed_dim, cfg.depths, cfg.num_heads, "the FPN builds p2..p5 from Swin's four stages")
    if cfg.window_size < 1 or any(d < 1 for d in cfg.depths):
        raise UserError(
            f"model.window_size={cfg.window_size} and model.depths={list(cfg.depths)} must be "
            "at least 1 (e.g. window_size 7, depths [2, 2, 6, 2])."
        )
    levels = _STAGES + 1  # + LastLevelMaxPool
    if len(cfg.anchor_sizes) != levels:
        raise UserError(
            f"model.anchor_sizes has {len(cfg.anchor_sizes)} entries but the feature pyramid has "
            f"{levels} levels (p2..p5 from the Swin stages + the max-pool level p6); give one "
            "anchor size per level, e.g. [32, 64, 128, 256, 512]."
        )


def _backbone(cfg: SwinConfig) -> FPN:
    bottom_up = SwinTransformer(
        patch_size=4,
        embed_dim=cfg.embed_dim,
        depths=tuple(cfg.depths),
        num_heads=tuple(cfg.num_heads),
        window_size=cfg.window_size,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias,
        drop_path_rate=cfg.drop_path_rate,
        out_indices=tuple(range(_STAGES)),
    )
    return FPN(
        bottom_up=bottom_up,
        in_features=list(bottom_up.output_shape()),
        out_channels=cfg.out_channels,
        norm=cfg.norm,
        top_block=LastLevelMaxPool(),
        square_pad=cfg.image_size,
    )


def build(cfg: SwinConfig, num_classes: int) -> GeneralizedRCNN:
    _check(cfg)
    return build_mask_rcnn(cfg, _backbone(cfg), num_classes, norm=cfg.norm)
