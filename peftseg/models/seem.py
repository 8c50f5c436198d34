"""Family `seem`: SEEM (Zou et al., NeurIPS 2023; the reference study's second model), its
instance-segmentation path, as a detectron2 meta-arch.

This module is light (no torch/detectron2 import at module level): the preset schema, the
FamilyMap that PEFT methods read, and the registration. The model is in
`peftseg.models._seem`, imported inside `build`.

Dataclass defaults are the released SEEM Focal-T v1 (configs/seem/focalt_unicl_lang_v1.yaml of
UX-Decoder/Segment-Everything-Everywhere-All-At-Once); presets under conf/model/seem_*.yaml list
only what differs.

The language encoder is frozen in every method, `full` included (FamilyMap.frozen): the class
embeddings are computed once per dataset and cached on the model, so `full` means the whole
visual model. The interactive/grounding parameters (see `_seem.decoder.UNUSED_PREFIXES`) are
loaded with the checkpoint and frozen too: the instance path never reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from omegaconf import MISSING

from peftseg import checks
from peftseg.errors import UserError
from peftseg.models.family import INPUT_FORMATS, FamilyMap
from peftseg.registry import register_family

if TYPE_CHECKING:
    import torch.nn as nn

_P = r"sem_seg_head\.predictor"
_ENC = r"sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.\d+"
_DEC_SELF = _P + r"\.transformer_self_attention_layers\.\d+"
_DEC_CROSS = _P + r"\.transformer_cross_attention_layers\.\d+"
_DEC_FFN = _P + r"\.transformer_ffn_layers\.\d+"
_BLOCK = r"backbone\.layers\.\d+\.blocks\.\d+"
_LANG = "sem_seg_head.predictor.lang_encoder."
# the interactive (spatial) path's parameters: in the checkpoints, not in the instance path
_SPATIAL = tuple(f"sem_seg_head.predictor.{p}" for p in
                 ("mask_sptial_embed.", "spatial_embed.", "spatial_featured.", "pn_indicator."))

FAMILY = FamilyMap(
    name="seem",
    groups={
        "backbone": ("backbone.",),
        "neck": ("sem_seg_head.pixel_decoder.",),
        "decoder": ("sem_seg_head.predictor.",),
        # PEFT methods train only these next to their modules: the projection into the language
        # space (class_embed, a bare Parameter) and the mask-embedding MLP
        "task_heads": ("sem_seg_head.predictor.class_embed", "sem_seg_head.predictor.mask_embed."),
        # the CLIP-style text encoder, its projection and logit scale: frozen everywhere
        "text": (_LANG,),
    },
    frozen=(_LANG, *_SPATIAL),
    adapter_sites={
        # the study's placement: after each decoder self-attention and (masked) cross-attention
        # and after each pixel-decoder encoder self-attention (nn.MultiheadAttention: the
        # adapter takes the first element of its (output, weights) tuple)
        "attn": rf"{_DEC_SELF}\.self_attn|{_DEC_CROSS}\.multihead_attn|{_ENC}\.self_attn",
        # the focal blocks' MLPs (width in = width out, so mlp_parallel works too)
        "mlp": rf"{_BLOCK}\.mlp",
    },
    lora_targets={
        # FocalNet has no attention: its token mixer is the focal modulation, whose input
        # projection f (query, context, gates) stands in for qkv and proj for the output
        "attn_qkv": rf"{_BLOCK}\.modulation\.f",
        "attn_proj": rf"{_BLOCK}\.modulation\.proj",
        "mlp": rf"{_BLOCK}\.mlp\.fc[12]",
        # nn.MultiheadAttention modules: peft (>= 0.15) puts LoRA on their in_proj and out_proj
        "decoder_attn": rf"{_DEC_SELF}\.self_attn|{_DEC_CROSS}\.multihead_attn",
        "decoder_self_attn": rf"{_DEC_SELF}\.self_attn",
        "decoder_cross_attn": rf"{_DEC_CROSS}\.multihead_attn",
        "pixel_decoder_attn": rf"{_ENC}\.self_attn",
        # the study grid's family-neutral name of the encoder attention (maskdino: deformable)
        "encoder_attn": rf"{_ENC}\.self_attn",
        "decoder_ffn": rf"{_DEC_FFN}\.linear[12]",
        "pixel_decoder_ffn": rf"{_ENC}\.linear[12]",
        "task_heads": rf"{_P}\.mask_embed\.layers\.\d+",
        # the pixel decoder's convs (detectron2 Conv2d; adapters and layers with GroupNorm inside):
        # the input projection, FPN adapters and layers, the mask-feature conv
        "pixel_decoder_conv": r"sem_seg_head\.pixel_decoder\.(?:input_proj|adapter_\d+|layer_\d+|mask_features)",
    },
    checkpoint_blocks=(_BLOCK, _ENC, _DEC_SELF, _DEC_CROSS, _DEC_FFN),
    backbone_blocks=_BLOCK,
    side_body="backbone",
    side_features={f"res{i + 2}": rf"backbone\.layers\.{i}\.blocks\.\d+" for i in range(4)},
)

_BACKBONES = ("focal_dw", "focal")


@dataclass
class SeemConfig:
    family: str = "seem"
    name: str = MISSING
    # an official SEEM checkpoint ({"model": state_dict} or a bare state dict, official key
    # names, e.g. seem_focalt_v1.pt) or a detectron2 checkpoint of this model
    weights: str = ""
    image_size: int = 1024  # the loaders resize each image's long side to at most this
    input_format: str = "RGB"
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    size_divisibility: int = 32
    # backbone: FocalNet, focal_dw (Focal-T v1) or focal (Focal-L v1)
    backbone: str = "focal_dw"
    embed_dim: int = 96
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    focal_levels: list[int] = field(default_factory=lambda: [3, 3, 3, 3])
    focal_windows: list[int] = field(default_factory=lambda: [3, 3, 3, 3])
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.3
    # pixel decoder (transformer_encoder_fpn): FPN width, mask features, encoder layers on res5
    conv_dim: int = 512
    mask_dim: int = 512
    enc_layers: int = 6
    # decoder (seem_v1); dec_layers counts the prediction from the learnable queries too
    hidden_dim: int = 512
    dim_proj: int = 512  # the language space the queries are classified in
    num_queries: int = 101
    nheads: int = 8  # decoder and pixel-decoder encoder attention heads
    dim_feedforward: int = 2048  # decoder and pixel-decoder encoder FFN width
    dec_layers: int = 10
    dropout: float = 0.0  # pixel-decoder encoder dropout (the decoder's is 0, as official)
    # text encoder (frozen; CLIP BPE tokenizer, 49,408 tokens)
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    context_length: int = 77
    # criterion (official weights)
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    test_topk_per_image: int = 100
    # the recipe's global gradient-norm clip (official SEEM: full_model, 5.0);
    # train.clip_grad_norm overrides it when set
    clip_grad_norm: float = 5.0

    def __post_init__(self) -> None:
        check(self)


def check(cfg) -> None:
    """Range and choice checks with a fix, before anything is built."""
    checks.number("model.clip_grad_norm", cfg.clip_grad_norm, low=0, why="0 disables clipping")
    checks.choice("model.input_format", cfg.input_format, INPUT_FORMATS)
    checks.choice("model.backbone", cfg.backbone, _BACKBONES)
    stages = (list(cfg.depths), list(cfg.focal_levels), list(cfg.focal_windows))
    if any(len(s) != 4 for s in stages) or min(cfg.depths) < 1 or min(cfg.focal_levels) < 1 \
            or min(cfg.focal_windows) < 1:
        raise UserError(
            f"model.depths={stages[0]}, model.focal_levels={stages[1]} and model.focal_windows={stages[2]} "
            "must each list 4 positive values, one per FocalNet stage (the pixel decoder reads "
            "res2..res5), e.g. [2, 2, 6, 2], [3, 3, 3, 3] and [3, 3, 3, 3] (Focal-T)."
        )
    if cfg.conv_dim % 32 or cfg.conv_dim != cfg.hidden_dim:
        raise UserError(
            f"model.conv_dim={cfg.conv_dim} must be a multiple of 32 (GroupNorm with 32 groups) and "
            f"equal model.hidden_dim={cfg.hidden_dim} (the decoder reads the pixel decoder's levels "
            "without input projections, as the released models do); e.g. 512 for both."
        )
    if cfg.hidden_dim % cfg.nheads or (cfg.hidden_dim // 2) % 2 or cfg.text_width % cfg.text_heads:
        raise UserError(
            f"model.hidden_dim={cfg.hidden_dim} must be divisible by model.nheads={cfg.nheads} and by 4 "
            f"(sine position embeddings), and model.text_width={cfg.text_width} by "
            f"model.text_heads={cfg.text_heads}; e.g. 512 with 8 heads."
        )
    positive = ("embed_dim", "enc_layers", "dec_layers", "num_queries", "dim_feedforward", "mask_dim",
                "dim_proj", "text_width", "text_layers", "train_num_points", "test_topk_per_image", "image_size")
    bad = [k for k in positive if getattr(cfg, k) < 1]
    if bad or cfg.size_divisibility % 32 or cfg.size_divisibility < 32:
        raise UserError(
            f"model.{', model.'.join(bad) or 'size_divisibility'} out of range: layer, query, point "
            "and width counts must be at least 1 and size_divisibility a positive multiple of 32 "
            "(the backbone's total stride)."
        )
    if cfg.context_length != 77:
        raise UserError(f"model.context_length={cfg.context_length}: the released text encoders and "
                        "CLIP's tokenizer use 77 positions; keep 77.")
    if not 0.0 <= cfg.dropout < 1.0 or not 0.0 <= cfg.drop_path_rate < 1.0 \
            or not 0.0 <= cfg.importance_sample_ratio <= 1.0 or cfg.oversample_ratio < 1.0:
        raise UserError(
            "model.dropout and model.drop_path_rate must be in [0, 1), model.importance_sample_ratio "
            f"in [0, 1] and model.oversample_ratio at least 1 (got {cfg.dropout}, {cfg.drop_path_rate}, "
            f"{cfg.importance_sample_ratio}, {cfg.oversample_ratio}); official: 0.0, 0.3, 0.75, 3.0."
        )
    weights = ("class_weight", "mask_weight", "dice_weight", "no_object_weight")
    negative = [k for k in weights if getattr(cfg, k) < 0]
    if negative:
        raise UserError(f"model.{negative[0]} is negative; loss and matching weights must be >= 0 "
                        "(official: class 2, mask 5, dice 5, no_object 0.1).")


@register_family("seem", config=SeemConfig, family_map=FAMILY,
                 summary="SEEM (FocalNet, transformer-encoder FPN, SEEM decoder classifying in a frozen "
                         "CLIP text space); loads official checkpoints")
def build(cfg: SeemConfig, num_classes: int) -> "nn.Module":
    check(cfg)
    from peftseg.models._seem.meta_arch import build_seem

    return build_seem(cfg, num_classes)
