"""Family `maskdino`: Mask DINO (the reference study's model) as a detectron2 meta-arch.

This module is light (no torch/detectron2 import at module level): it holds the preset
schema, the FamilyMap that PEFT methods read, and the registration. The model itself is in
`peftseg.models._maskdino`, imported inside `build`.

Dataclass defaults are the published COCO instance-segmentation R50 shape
(configs/coco/instance-segmentation/maskdino_R50_bs16_50ep_3s.yaml of IDEA-Research/MaskDINO);
presets under conf/model/maskdino_*.yaml list only what differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from omegaconf import MISSING

from peftseg import checks
from peftseg.errors import UserError
from peftseg.models._msda import IMPLS
from peftseg.models.family import INPUT_FORMATS, FamilyMap
from peftseg.models.swin import SWIN_STATE_DICT, SWIN_TOKEN_GRID, check_swin_stages
from peftseg.registry import register_family

if TYPE_CHECKING:
    import torch.nn as nn

_P = r"sem_seg_head\.predictor"
_ENC = r"sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.\d+"
_DEC = _P + r"\.decoder\.layers\.\d+"
_SWIN_BLOCK = r"backbone\.layers\.\d+\.blocks\.\d+"
_DEFORM_PARTS = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
# the box MLP is one module shared by every decoder layer and the query selection; peft and
# named_parameters see it under its first name, decoder.bbox_embed.0, the others are aliases
_BOX_PREFIXES = tuple(f"sem_seg_head.predictor.{p}." for p in ("_bbox_embed", "bbox_embed", "decoder.bbox_embed"))

FAMILY = FamilyMap(
    name="maskdino",
    groups={
        "backbone": ("backbone.",),
        "neck": ("sem_seg_head.pixel_decoder.",),
        "decoder": ("sem_seg_head.predictor.",),
        # PEFT methods train only these next to their modules: the class head and the box MLP
        # (both also the query-selection heads of the encoder tokens: Mask DINO shares them),
        # the mask-embedding MLP, and the denoising label embedding (class-dependent too)
        "task_heads": (
            "sem_seg_head.predictor.class_embed.",
            "sem_seg_head.predictor.mask_embed.",
            "sem_seg_head.predictor.label_enc.",
            *_BOX_PREFIXES,
        ),
    },
    adapter_sites={
        # where the study placed its adapters: after each encoder deformable self-attention and
        # after each decoder self-attention and deformable cross-attention (each returns the
        # sub-layer's output before its residual add, a plain tensor)
        "attn": rf"{_ENC}\.self_attn|{_DEC}\.(?:self_attn|cross_attn)",
        # the FFN is inline in the layers (linear1 -> relu -> linear2 -> residual): linear2's
        # output is the FFN's output; its input is the d_ffn-wide hidden, so mlp_parallel is
        # refused with a clear message
        "mlp": rf"(?:{_ENC}|{_DEC})\.linear2",
    },
    lora_targets={
        "deform_attn": rf"{_ENC}\.self_attn\.(?:{'|'.join(_DEFORM_PARTS)})",
        "decoder_deform_attn": rf"{_DEC}\.cross_attn\.(?:{'|'.join(_DEFORM_PARTS)})",
        # family-neutral names of the two the study's grid (conf/study/) adapts, which seem
        # maps to its own encoder and cross-attention
        "encoder_attn": rf"{_ENC}\.self_attn\.(?:{'|'.join(_DEFORM_PARTS)})",
        "decoder_cross_attn": rf"{_DEC}\.cross_attn\.(?:{'|'.join(_DEFORM_PARTS)})",
        **{part: rf"(?:{_ENC}\.self_attn|{_DEC}\.cross_attn)\.{part}" for part in _DEFORM_PARTS},
        # the output projection of each decoder self-attention: its q/k/v projection is one
        # fused Parameter (in_proj_weight, the official name), which Linear LoRA cannot wrap
        "decoder_self_attn": rf"{_DEC}\.self_attn\.out_proj",
        # Swin backbone (the ResNet backbone has no attention: these match nothing there)
        "attn_qkv": rf"{_SWIN_BLOCK}\.attn\.qkv",
        "attn_proj": rf"{_SWIN_BLOCK}\.attn\.proj",
        "mlp": rf"{_SWIN_BLOCK}\.mlp\.fc[12]",
        "task_heads": rf"{_P}\.(?:class_embed|mask_embed\.layers\.\d+|decoder\.bbox_embed\.\d+\.layers\.\d+)",
        # the pixel decoder's convs: input projections (nn.Conv2d, GroupNorm beside it), the FPN
        # adapters and layers (detectron2 Conv2d with GroupNorm inside) and the mask-feature conv
        "pixel_decoder_conv": r"sem_seg_head\.pixel_decoder\.(?:input_proj\.\d+\.0|adapter_\d+|layer_\d+|mask_features)",
        # the ResNet backbone's convs (detectron2 Conv2d with FrozenBatchNorm inside): stem, the
        # blocks' convs and projection shortcuts (the Swin backbone has none: this matches nothing)
        "backbone_conv": r"backbone\.(?:stem\.conv1|res[2-5]\.\d+\.(?:conv[1-3]|shortcut))",
    },
    # the Swin backbone's blocks: `method.blocks` indexes them, and stage i's blocks feed its
    # output res{i+2} for the `side` method (the ResNet backbone has none: both then refuse)
    backbone_blocks=_SWIN_BLOCK,
    # recomputed in backward under train.activation_checkpointing: Swin blocks, and every
    # deformable encoder layer and decoder layer
    checkpoint_blocks=(_SWIN_BLOCK, _ENC, _DEC),
    # the pixel decoder's convs around its encoder (whose layers are blocks), and the
    # decoder's prediction heads, whose per-layer mask logits are its biggest tensors
    checkpoint_neck=(r"sem_seg_head\.pixel_decoder\.(?:input_proj\.\d+|adapter_\d+|layer_\d+|mask_features)",),
    checkpoint_heads=(_P + ":prediction_heads",),
    side_body="backbone",
    side_features={f"res{i + 2}": rf"backbone\.layers\.{i}\.blocks\.\d+" for i in range(4)},
    # detectron2's Swin blocks (the ResNet backbone has none: Mona then refuses)
    token_grid=SWIN_TOKEN_GRID,
)

# official Swin ImageNet weights (e.g. swin_large_patch4_window12_384_22k.pth) go straight to
# `backbone.`: the backbone is detectron2's SwinTransformer, the official module tree
MASKDINO_SWIN_STATE_DICT = replace(
    SWIN_STATE_DICT, hint="e.g. model=maskdino_swin_l for swin_large_patch4_window12_384_22k.pth")

_ORDERS = ("low2high", "high2low")
_BACKBONES = ("resnet", "swin")
_BOX_INIT = ("bitmask", "mask2box", "no")
_DN = ("seg", "no")
_LEVELS = ("res2", "res3", "res4", "res5")


@dataclass
class MaskDinoConfig:
    family: str = "maskdino"
    name: str = MISSING
    # an official Mask DINO checkpoint ({"model": state_dict}, official key names), a
    # detectron2 checkpoint of this model, or an official Swin ImageNet state dict
    weights: str = ""
    image_size: int = 1024  # the loaders resize each image's long side to at most this
    input_format: str = "RGB"
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    size_divisibility: int = 32
    # backbone: resnet (detectron2's builder, FrozenBN, torchvision-style stride in 3x3) or swin
    backbone: str = "resnet"
    resnet_depth: int = 50
    embed_dim: int = 96  # Swin (patch 4)
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.3
    pretrain_img_size: int = 224
    # pixel decoder: deformable encoder over these backbone levels (+ extra stride-2 levels
    # up to total_num_feature_levels), GN convs, mask features at stride 4
    encoder_in_features: list[str] = field(default_factory=lambda: ["res3", "res4", "res5"])
    total_num_feature_levels: int = 3
    feature_order: str = "high2low"  # low2high | high2low (official FEATURE_ORDER)
    conv_dim: int = 256
    mask_dim: int = 256
    enc_layers: int = 6
    enc_dim_feedforward: int = 1024
    nheads: int = 8  # encoder and decoder attention heads
    n_points: int = 4  # deformable sampling points per head and level
    dropout: float = 0.0
    # decoder (dec_layers deformable layers + the prediction from the selected queries)
    hidden_dim: int = 256
    num_queries: int = 300
    dec_layers: int = 9
    dim_feedforward: int = 2048
    initialize_box_type: str = "bitmask"  # bitmask | mask2box | no (mask-enhanced anchors)
    dn: str = "seg"  # seg (denoise labels, boxes and masks) | no
    dn_num: int = 100  # denoising queries per image (split into groups of the GT count)
    dn_noise_scale: float = 0.4
    # criterion (official weights)
    class_weight: float = 4.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    box_weight: float = 5.0
    giou_weight: float = 2.0
    cost_class_weight: float = 4.0
    cost_mask_weight: float = 5.0
    cost_dice_weight: float = 5.0
    cost_box_weight: float = 5.0
    cost_giou_weight: float = 2.0
    no_object_weight: float = 0.1  # only the checkpoint's criterion.empty_weight reads it
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    test_topk_per_image: int = 100
    # multi-scale deformable attention: auto | triton | pytorch (models/_msda.py; auto is the
    # grid_sample path until a GPU measurement shows the Triton kernels correct and faster)
    deform_attn_impl: str = "auto"
    # the recipe's global gradient-norm clip (official Mask DINO: full_model, 0.01);
    # train.clip_grad_norm overrides it when set
    clip_grad_norm: float = 0.01

    def __post_init__(self) -> None:
        check(self)


def _choice(cfg, key: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, key)
    if value not in choices:
        raise UserError(f"model.{key}={value!r} is not supported; choose one of {list(choices)}.")


def check(cfg) -> None:
    """Range and choice checks with a fix, before anything is built."""
    checks.number("model.clip_grad_norm", cfg.clip_grad_norm, low=0, why="0 disables clipping")
    checks.choice("model.input_format", cfg.input_format, INPUT_FORMATS)
    checks.choice("model.deform_attn_impl", cfg.deform_attn_impl, IMPLS)
    for key, choices in (("backbone", _BACKBONES), ("feature_order", _ORDERS),
                         ("initialize_box_type", _BOX_INIT), ("dn", _DN)):
        _choice(cfg, key, choices)
    if cfg.backbone == "resnet" and cfg.resnet_depth not in (18, 34, 50, 101, 152):
        raise UserError(f"model.resnet_depth={cfg.resnet_depth} is not a ResNet depth; use 50 or 101 (18/34/152 also build).")
    if cfg.backbone == "swin":
        check_swin_stages(cfg.embed_dim, cfg.depths, cfg.num_heads,
                          "the pixel decoder reads res2..res5 from Swin's four stages")
        if cfg.window_size < 1 or min(cfg.depths) < 1:
            raise UserError(f"model.window_size={cfg.window_size} and model.depths={list(cfg.depths)} "
                            "must be at least 1 (e.g. window_size 12, depths [2, 2, 18, 2]).")
    levels = list(cfg.encoder_in_features)
    if not levels or any(f not in _LEVELS for f in levels) or len(set(levels)) != len(levels):
        raise UserError(
            f"model.encoder_in_features={levels} must list distinct backbone levels out of "
            f"{list(_LEVELS)}, e.g. [res3, res4, res5] (R50) or [res2, res3, res4, res5] (Swin 4-level)."
        )
    if cfg.total_num_feature_levels < len(levels):
        raise UserError(
            f"model.total_num_feature_levels={cfg.total_num_feature_levels} is below the "
            f"{len(levels)} levels of model.encoder_in_features; it counts them plus the extra "
            "stride-2 levels, e.g. 3 for [res3, res4, res5], 5 for four levels plus one."
        )
    if cfg.conv_dim % 32 or cfg.mask_dim < 1 or cfg.hidden_dim != cfg.conv_dim:
        raise UserError(
            f"model.conv_dim={cfg.conv_dim} must be a multiple of 32 (GroupNorm with 32 groups) "
            f"and equal model.hidden_dim={cfg.hidden_dim} (the decoder reads the encoder's "
            "tokens as they are); e.g. 256 for both."
        )
    if cfg.hidden_dim % cfg.nheads or (cfg.hidden_dim // 2) % 2:
        raise UserError(
            f"model.hidden_dim={cfg.hidden_dim} must be divisible by model.nheads={cfg.nheads} and "
            "by 4 (the sine position embeddings split it in halves of even width); e.g. 256 and 8."
        )
    positive = ("enc_layers", "dec_layers", "num_queries", "n_points", "enc_dim_feedforward",
                "dim_feedforward", "train_num_points", "test_topk_per_image", "image_size")
    bad = [k for k in positive if getattr(cfg, k) < 1]
    if bad or cfg.dn_num < 0 or cfg.size_divisibility % 32 or cfg.size_divisibility < 32:
        raise UserError(
            f"model.{', model.'.join(bad) or 'dn_num/size_divisibility'} out of range: the layer, "
            "query, point and width counts must be at least 1, dn_num at least 0 and "
            "size_divisibility a positive multiple of 32 (the backbone's total stride)."
        )
    if not 0.0 <= cfg.dropout < 1.0 or not 0.0 <= cfg.dn_noise_scale <= 1.0 \
            or not 0.0 <= cfg.importance_sample_ratio <= 1.0 or cfg.oversample_ratio < 1.0:
        raise UserError(
            "model.dropout must be in [0, 1), model.dn_noise_scale and "
            "model.importance_sample_ratio in [0, 1], and model.oversample_ratio at least 1 "
            f"(got {cfg.dropout}, {cfg.dn_noise_scale}, {cfg.importance_sample_ratio}, "
            f"{cfg.oversample_ratio}); the official values are 0.0, 0.4, 0.75 and 3.0."
        )
    weights = ("class_weight", "mask_weight", "dice_weight", "box_weight", "giou_weight",
               "cost_class_weight", "cost_mask_weight", "cost_dice_weight", "cost_box_weight",
               "cost_giou_weight", "no_object_weight")
    negative = [k for k in weights if getattr(cfg, k) < 0]
    if negative:
        raise UserError(f"model.{negative[0]} is negative; loss and matching weights must be >= 0 "
                        "(official: class 4, mask 5, dice 5, box 5, giou 2).")


@register_family("maskdino", config=MaskDinoConfig, family_map=FAMILY,
                 summary="Mask DINO (deformable encoder, two-stage queries, DINO decoder); loads official checkpoints",
                 weight_layouts=(MASKDINO_SWIN_STATE_DICT,))
def build(cfg: MaskDinoConfig, num_classes: int) -> "nn.Module":
    check(cfg)
    from peftseg.models._maskdino.deform_attn import MSDeformAttn
    from peftseg.models._maskdino.meta_arch import build_maskdino
    from peftseg.models._msda import set_impl

    model = build_maskdino(cfg, num_classes)
    set_impl(model, cfg.deform_attn_impl, MSDeformAttn)
    return model
