"""Family `vitdet`: detectron2 ViT + SimpleFeaturePyramid + Mask R-CNN.

The graph mirrors detectron2's model-zoo LazyConfig
`configs/common/models/mask_rcnn_vitdet.py` (itself `mask_rcnn_fpn.py` with the ViT
backbone, LN in neck and heads, 2-conv RPN head, 4conv1fc box head); the Mask R-CNN part
is `rcnn.build_mask_rcnn`, shared with the swin family. Every module is detectron2's own
class built from constructor kwargs; only the sizes come from the config, so one code
path serves the CPU-sized preset and the published ViT-B shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from peftseg.errors import UserError
from peftseg import checks
from peftseg.models.family import FamilyMap, TokenGrid, WeightLayout
from peftseg.models.rcnn import (HEAD_CHECKPOINT, HEAD_CONV_LORA_TARGETS, HEAD_PREFIXES, HEADS_LORA_TARGETS, MaskRCNNConfig,
                                  build_mask_rcnn)
from peftseg.registry import register_family

_BLOCK = r"backbone\.net\.blocks\.\d+"

FAMILY = FamilyMap(
    name="vitdet",
    groups={
        "backbone": ("backbone.net.",),
        "neck": ("backbone.",),
        "task_heads": HEAD_PREFIXES,  # RPN + ROI heads
    },
    # the FPN / feature pyramid starts untrained (no backbone checkpoint holds it)
    task_layers=("neck", "task_heads"),
    adapter_sites={"attn": _BLOCK + r"\.attn", "mlp": _BLOCK + r"\.mlp"},
    lora_targets={
        "attn_qkv": _BLOCK + r"\.attn\.qkv",
        "attn_proj": _BLOCK + r"\.attn\.proj",
        "mlp": _BLOCK + r"\.mlp\.fc[12]",
        "task_heads": HEADS_LORA_TARGETS,
        # SimpleFeaturePyramid's 1x1 and 3x3 convs (detectron2 Conv2d with LN inside), the last two
        # modules of each stage; before them a stage has ConvTranspose2d/LN/GELU (scale 4: 0-3,
        # scale 2: 0) or a max-pool (scale 0.5: 0), which LoRA does not wrap. The stage names
        # simfp_2..5 are those of the 16-px patch every preset uses (stride = patch / scale).
        "neck_conv": r"backbone\.simfp_2\.[45]|backbone\.simfp_[35]\.[12]|backbone\.simfp_4\.[01]",
        **HEAD_CONV_LORA_TARGETS,
    },
    checkpoint_blocks=(_BLOCK,),
    # SimpleFeaturePyramid's per-scale stages (simfp_2 … simfp_5): each keeps only the ViT's
    # feature map, where its LayerNorms would keep several full-size maps each
    checkpoint_neck=(r"backbone\.simfp_\d+",),
    checkpoint_heads=HEAD_CHECKPOINT,
    backbone_blocks=_BLOCK,
    # every ViT block feeds the one plain feature map SimpleFeaturePyramid reads
    side_body="backbone.net",
    side_features={"last_feat": _BLOCK},
    # ViT blocks pass (B, H, W, C) tokens; norm2 reads the stream after the attention residual
    token_grid=TokenGrid(norm="norm2", layout="bhwc"),
)

# the scale factors SimpleFeaturePyramid implements
_SUPPORTED_SCALES = (4.0, 2.0, 1.0, 0.5)
# model.attention's choices: efficient builds models/_vit_attention.py's module with the rel-pos
# path picked per device; chunked, sdpa, flex pin one path; detectron2 builds detectron2's own
ATTENTIONS = ("efficient", "chunked", "sdpa", "flex", "detectron2")


@dataclass
class VitDetConfig(MaskRCNNConfig):  # + RPN/ROI-head sizes, pixel mean/std
    family: str = "vitdet"
    name: str = MISSING
    # path or URL: a detectron2 checkpoint, or a timm/MAE ViT state dict (mapped onto
    # backbone.net, position embeddings resized; see weights.py)
    weights: str = ""
    # ViT input size: batches are padded to this square (ViTDet's square_pad), so the data
    # mapper must resize every image's long side to at most this
    image_size: int = 1024
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
    # efficient: the same attention without detectron2's stored N x N maps
    # (models/_vit_attention.py), its rel-pos path picked per device (CUDA: SDPA with the bias
    # as mask; CPU: query chunks); chunked | sdpa | flex: that path on any device (flex: CUDA
    # for training); detectron2: the stock forward (the reference, and the peer row of
    # scripts/benchmark.py). Parameters and checkpoints are the same for all.
    attention: str = "efficient"
    drop_path_rate: float = 0.1
    pretrain_img_size: int = 224  # size of the absolute position table in pretrained weights
    # SimpleFeaturePyramid
    out_channels: int = 256
    scale_factors: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])
    norm: str = "LN"  # neck and box/mask head convs

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.integer("model.image_size", self.image_size, minimum=32)
        # sizes detectron2's ViT would take and then fail on with a ZeroDivisionError or an empty model
        for key in ("embed_dim", "depth", "num_heads", "patch_size", "window_size", "pretrain_img_size"):
            checks.integer(f"model.{key}", getattr(self, key), minimum=1 if key != "window_size" else 0)
        checks.number("model.drop_path_rate", self.drop_path_rate, low=0, high=1, high_open=True,
                      why="it is the probability of skipping a block's residual branch (ViTDet uses 0.1)")
        checks.number("model.mlp_ratio", self.mlp_ratio, low=0, low_open=True)
        outside = [i for i in self.window_block_indexes
                   if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.depth)]
        if outside:
            raise UserError(
                f"model.window_block_indexes={list(self.window_block_indexes)} names block(s) {outside} that "
                f"model.depth={self.depth} does not have (blocks are 0..{self.depth - 1}); list indexes of existing "
                "blocks, e.g. model.window_block_indexes="
                f"{[i for i in range(self.depth) if i % 3 != 2] or [0]} (ViTDet's pattern: global every third block)."
            )
        if self.attention not in ATTENTIONS:
            raise UserError(
                f"model.attention={self.attention!r} is not an attention implementation; use "
                "model.attention=efficient (default: same results, no stored full attention maps, the "
                "path picked per device), chunked, sdpa or flex (one path on every device) or "
                "model.attention=detectron2 (detectron2's own forward, the reference)."
            )
        # shapes detectron2 would reject with a bare assertion, or not at all
        if self.embed_dim % self.num_heads:
            raise UserError(
                f"model.embed_dim={self.embed_dim} is not divisible by model.num_heads="
                f"{self.num_heads}; pick values where embed_dim is a multiple of num_heads."
            )
        bad = [s for s in self.scale_factors if float(s) not in _SUPPORTED_SCALES]
        if bad or not self.scale_factors:
            raise UserError(
                f"model.scale_factors={list(self.scale_factors)} is not supported: "
                f"SimpleFeaturePyramid builds levels only for scale factors {list(_SUPPORTED_SCALES)}; "
                "list one or more of them, largest first and halving each step (e.g. [2.0, 1.0, 0.5])."
            )
        strides = [int(self.patch_size / s) for s in self.scale_factors]
        if any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise UserError(
                f"model.scale_factors={list(self.scale_factors)} gives strides {strides}, which must "
                "double from one level to the next; list the factors largest first without gaps "
                "(e.g. [4.0, 2.0, 1.0, 0.5])."
            )
        levels = len(strides) + 1  # + LastLevelMaxPool
        if len(self.anchor_sizes) != levels:
            raise UserError(
                f"model.anchor_sizes has {len(self.anchor_sizes)} entries but the feature pyramid has "
                f"{levels} levels ({len(strides)} scale factors + the max-pool level); give one "
                "anchor size per level, e.g. 8x each level's stride."
            )
        if self.image_size % self.patch_size:
            raise UserError(
                f"model.image_size={self.image_size} is not a multiple of model.patch_size="
                f"{self.patch_size}; choose an image size the patch size divides."
            )


def _backbone(cfg: VitDetConfig):
    from functools import partial

    import torch.nn as nn
    from detectron2.modeling import SimpleFeaturePyramid, ViT
    from detectron2.modeling.backbone.fpn import LastLevelMaxPool

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
    if cfg.attention != "detectron2":
        from peftseg.models._vit_attention import use_efficient_attention

        use_efficient_attention(net, "auto" if cfg.attention == "efficient" else cfg.attention)
    return SimpleFeaturePyramid(
        net=net,
        in_feature="last_feat",
        out_channels=cfg.out_channels,
        scale_factors=tuple(float(s) for s in cfg.scale_factors),
        top_block=LastLevelMaxPool(),
        norm=cfg.norm,
        square_pad=cfg.image_size,
    )


TIMM_VIT = WeightLayout(
    description="a timm/MAE ViT state dict",
    detect=lambda state: "patch_embed.proj.weight" in state and any(k.startswith("blocks.") for k in state),
    hint="e.g. model=vitdet_b for ViT-B/16 weights such as MAE's mae_pretrain_vit_base.pth",
)


@register_family("vitdet", config=VitDetConfig, family_map=FAMILY, weight_layouts=(TIMM_VIT,),
                 summary="detectron2 ViT + SimpleFeaturePyramid + Mask R-CNN (ViTDet)")
def build(cfg: VitDetConfig, num_classes: int):
    return build_mask_rcnn(cfg, _backbone(cfg), num_classes, norm=cfg.norm)
