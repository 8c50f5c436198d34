"""Family `swin`: detectron2 SwinTransformer + FPN + Mask R-CNN.

The graph is the one detectron2's ViTDet project uses for its Swin baselines
(`projects/ViTDet/configs/COCO/*_swin_*`): `SwinTransformer` as the FPN's bottom-up
network, LN in the FPN and the head convs, batches padded to a square, and the same Mask
R-CNN heads as the vitdet family (`rcnn.build_mask_rcnn`; ViTDet's Swin configs are
cascade, this family keeps the plain Mask R-CNN of the published Swin results).
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

_BLOCK = r"backbone\.bottom_up\.layers\.\d+\.blocks\.\d+"

SWIN_TOKEN_GRID = TokenGrid(norm="norm2", layout="block_hw")

FAMILY = FamilyMap(
    name="swin",
    groups={
        "backbone": ("backbone.bottom_up.",),
        "neck": ("backbone.",),
        "task_heads": HEAD_PREFIXES,  # RPN + ROI heads
    },
    # the FPN / feature pyramid starts untrained (no backbone checkpoint holds it)
    task_layers=("neck", "task_heads"),
    # WindowAttention returns the windows' tokens (B·windows, window², C): a token-wise
    # adapter sees every token once, only grouped by window
    adapter_sites={"attn": _BLOCK + r"\.attn", "mlp": _BLOCK + r"\.mlp"},
    lora_targets={
        "attn_qkv": _BLOCK + r"\.attn\.qkv",
        "attn_proj": _BLOCK + r"\.attn\.proj",
        "mlp": _BLOCK + r"\.mlp\.fc[12]",
        "task_heads": HEADS_LORA_TARGETS,
        # the FPN's lateral (1x1) and output (3x3) convs, detectron2 Conv2d with LN inside
        "neck_conv": r"backbone\.fpn_(?:lateral|output)\d+",
        **HEAD_CONV_LORA_TARGETS,
    },
    checkpoint_blocks=(_BLOCK,),
    # detectron2's FPN: each lateral and output conv with its norm (the top-down sums are cheap)
    checkpoint_neck=(r"backbone\.fpn_(?:lateral|output)\d+",),
    checkpoint_heads=HEAD_CHECKPOINT,
    backbone_blocks=_BLOCK,
    # stage i's blocks feed its output p{i} (detectron2's SwinTransformer names them by stage)
    side_body="backbone.bottom_up",
    side_features={f"p{i}": rf"backbone\.bottom_up\.layers\.{i}\.blocks\.\d+" for i in range(4)},
    # SwinTransformerBlock: (B, H·W, C) tokens, its stage sets blk.H, blk.W before each call
    token_grid=SWIN_TOKEN_GRID,
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

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.integer("model.image_size", self.image_size, minimum=32)
        # shapes detectron2 would reject with a bare assertion, or not at all
        check_swin_stages(self.embed_dim, self.depths, self.num_heads, "the FPN builds p2..p5 from Swin's four stages")
        if self.window_size < 1 or any(d < 1 for d in self.depths):
            raise UserError(
                f"model.window_size={self.window_size} and model.depths={list(self.depths)} must be "
                "at least 1 (e.g. window_size 7, depths [2, 2, 6, 2])."
            )
        levels = _STAGES + 1  # + LastLevelMaxPool
        if len(self.anchor_sizes) != levels:
            raise UserError(
                f"model.anchor_sizes has {len(self.anchor_sizes)} entries but the feature pyramid has "
                f"{levels} levels (p2..p5 from the Swin stages + the max-pool level p6); give one "
                "anchor size per level, e.g. [32, 64, 128, 256, 512]."
            )


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


def _backbone(cfg: SwinConfig):
    from detectron2.modeling import FPN, SwinTransformer
    from detectron2.modeling.backbone.fpn import LastLevelMaxPool

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


def _timm_swin_to_official(state: dict) -> dict:
    """timm (>= 0.6) puts each PatchMerging at the start of the next stage
    (layers.{i+1}.downsample); the official code and detectron2 at the end of its own."""
    if any(k.startswith("layers.0.downsample.") for k in state):
        return state
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if len(parts) > 3 and parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        out[".".join(parts)] = v
    return out


SWIN_STATE_DICT = WeightLayout(
    description="an official Swin state dict",
    detect=lambda state: "patch_embed.proj.weight" in state
    and any(k.startswith("layers.") and ".blocks." in k for k in state),
    hint="e.g. model=swin_t for swin_tiny_patch4_window7_224.pth, model=swin_b for "
         "swin_base_patch4_window7_224.pth",
    normalize=_timm_swin_to_official,
)


@register_family("swin", config=SwinConfig, family_map=FAMILY, weight_layouts=(SWIN_STATE_DICT,),
                 summary="detectron2 SwinTransformer + FPN + Mask R-CNN")
def build(cfg: SwinConfig, num_classes: int):
    return build_mask_rcnn(cfg, _backbone(cfg), num_classes, norm=cfg.norm)
