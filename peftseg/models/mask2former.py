"""Family `mask2former`: transformers' Mask2Former (Swin backbone, multi-scale deformable
attention pixel decoder, masked-attention transformer decoder) as a detectron2 meta-arch.

transformers' implementation is used as is: its modules, its criterion (Hungarian matcher,
point-sampled mask/dice losses, deep supervision) and its loss weights. The wrapper only
translates between detectron2's batched_inputs and the model's pixel_values / mask_labels /
class_labels, and turns its query outputs into detectron2 Instances, so detectron2's
trainer, COCOEvaluator and the run record serve it like any other family.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from peftseg import checks
from peftseg.errors import UserError
from peftseg.models._msda import IMPLS
from peftseg.models.family import INPUT_FORMATS, FamilyMap, TokenGrid
from peftseg.models.swin import check_swin_stages
from peftseg.registry import register_family

_HF = "m2f."  # attribute of the wrapper that holds the transformers model
_SWIN_BLOCK = r"m2f\.model\.pixel_level_module\.encoder\.swin\.encoder\.layers\.\d+\.blocks\.\d+"
_DEFORM = r"m2f\.model\.pixel_level_module\.decoder\.encoder\.layers\.\d+\.self_attn"
_PIXEL_ENC_LAYER = r"m2f\.model\.pixel_level_module\.decoder\.encoder\.layers\.\d+"
_DEC_LAYER = r"m2f\.model\.transformer_module\.decoder\.layers\.\d+"

FAMILY = FamilyMap(
    name="mask2former",
    groups={
        "backbone": (_HF + "model.pixel_level_module.encoder.",),
        # pixel decoder: input projections, deformable-attention encoder, FPN level, mask projection
        "neck": (_HF + "model.pixel_level_module.decoder.",),
        "decoder": (_HF + "model.transformer_module.",),
        # PEFT methods keep the pixel decoder and the transformer decoder frozen (they are what
        # deform_attn/decoder_attn LoRA and the adapters adapt) and train only the class
        # predictor and the mask embedder, as the reference study trained the heads
        "task_heads": (_HF + "class_predictor.", _HF + "model.transformer_module.decoder.mask_predictor.mask_embedder."),
    },
    adapter_sites={
        # the deformable self-attention of each pixel-decoder encoder layer, and the self- and
        # (masked) cross-attention of each decoder layer; all return (output, weights) tuples
        "attn": rf"{_DEFORM}|{_DEC_LAYER}\.(?:self_attn|cross_attn)",
        # the FFN is inline in those layers' forward (fc1 -> act -> fc2 -> residual), so fc2's
        # output is the FFN's output; its input is the d_ff-wide hidden, not the layer input,
        # which is why the adapter method refuses `mlp_parallel` here with a clear message
        "mlp": rf"(?:{_PIXEL_ENC_LAYER}|{_DEC_LAYER})\.fc2",
    },
    lora_targets={
        "deform_attn": rf"{_DEFORM}\.(?:sampling_offsets|attention_weights|value_proj|output_proj)",
        "deform_sampling_offsets": rf"{_DEFORM}\.sampling_offsets",
        "deform_attention_weights": rf"{_DEFORM}\.attention_weights",
        "deform_value_proj": rf"{_DEFORM}\.value_proj",
        "deform_output_proj": rf"{_DEFORM}\.output_proj",
        # the decoder's self-attention (q/k/v Linears); its masked cross-attention is a torch
        # nn.MultiheadAttention (one fused in_proj_weight, an out_proj F.multi_head_attention_forward
        # reads directly), which peft (>= 0.15) wraps as a whole: LoRA on in_proj and out_proj
        "decoder_attn": rf"{_DEC_LAYER}\.self_attn\.[qkv]_proj",
        "decoder_cross_attn": rf"{_DEC_LAYER}\.cross_attn",
        # transformers >= 5 names Swin's projections q/k/v/o_proj and mlp.fc1/fc2; 4.x named
        # them attention.self.query/key/value, attention.output.dense, intermediate/output.dense
        "attn_qkv": rf"{_SWIN_BLOCK}\.attention\.(?:[qkv]_proj|self\.(?:query|key|value))",
        "attn_proj": rf"{_SWIN_BLOCK}\.attention\.(?:o_proj|output\.dense)",
        "mlp": rf"{_SWIN_BLOCK}\.(?:mlp\.fc[12]|intermediate\.dense|output\.dense)",
        "task_heads": r"m2f\.class_predictor|m2f\.model\.transformer_module\.decoder\.mask_predictor"
                 r"\.mask_embedder\.\d+\.0",
        # the pixel decoder's convs: input projections (1x1), FPN adapters (1x1) and layers (3x3),
        # the mask projection; plain nn.Conv2d, each followed by its GroupNorm as its own module
        "pixel_decoder_conv": r"m2f\.model\.pixel_level_module\.decoder\.(?:"
                              r"(?:input_projections\.\d+|adapter_\d+|layer_\d+)\.0|mask_projection)",
    },
    # Swin blocks, deformable-attention encoder layers, masked-attention decoder layers
    checkpoint_blocks=(_SWIN_BLOCK, _PIXEL_ENC_LAYER, _DEC_LAYER),
    backbone_blocks=_SWIN_BLOCK,
    # transformers' SwinBackbone returns BackboneOutput.feature_maps, one map per stage
    # (normed, before downsampling): stage i's blocks feed feature_maps[i]
    side_body=_HF + "model.pixel_level_module.encoder",
    side_features={f"feature_maps.{i}": rf"m2f\.model\.pixel_level_module\.encoder\.swin\.encoder\.layers\.{i}\.blocks\.\d+"
                   for i in range(4)},
    # transformers' SwinLayer: (B, H·W, C) tokens, forward(hidden_states, input_dimensions, …)
    token_grid=TokenGrid(norm="layernorm_after", layout="input_dimensions"),
)


@dataclass
class Mask2FormerConfig:
    family: str = "mask2former"
    name: str = MISSING
    # a transformers checkpoint directory (config.json + model.safetensors, e.g. a local copy of
    # facebook/mask2former-swin-tiny-coco-instance) or a detectron2 checkpoint of this wrapper
    weights: str = ""
    image_size: int = 1024  # the loaders resize each image's long side to at most this
    input_format: str = "RGB"
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    size_divisibility: int = 32  # Swin's total stride: each stage halves the patch grid
    # Swin backbone (patch size 4; four stages at strides 4, 8, 16, 32)
    embed_dim: int = 96
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.3
    # pixel decoder (deformable-attention encoder over strides 8-32, FPN level at stride 4)
    feature_size: int = 256
    mask_feature_size: int = 256
    encoder_layers: int = 6
    encoder_feedforward_dim: int = 1024
    # transformer decoder; decoder_layers counts as Mask2Former and transformers do: the
    # prediction from the learnable queries plus decoder_layers - 1 masked-attention layers
    hidden_dim: int = 256
    decoder_layers: int = 10
    num_attention_heads: int = 8  # of the deformable attention and of the decoder
    dim_feedforward: int = 2048
    num_queries: int = 100
    dropout: float = 0.0
    pre_norm: bool = False
    # criterion (transformers' Mask2FormerLoss; its defaults are the paper's)
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    train_num_points: int = 12544  # points sampled per mask for matching and mask losses
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    # inference: top-k (query, class) pairs kept per image
    test_topk_per_image: int = 100
    # the recipe's global gradient-norm clip (Mask2Former: 0.01); train.clip_grad_norm overrides
    clip_grad_norm: float = 0.01
    # pixel decoder's deformable attention: auto | triton | pytorch (models/_msda.py; auto is
    # transformers' grid_sample path until a GPU measurement shows the Triton kernels faster)
    deform_attn_impl: str = "auto"

    def __post_init__(self) -> None:
        checks.integer("model.image_size", self.image_size, minimum=32)
        checks.number("model.clip_grad_norm", self.clip_grad_norm, low=0, why="0 disables clipping")
        checks.choice("model.input_format", self.input_format, INPUT_FORMATS)
        checks.choice("model.deform_attn_impl", self.deform_attn_impl, IMPLS)
        # shapes transformers would reject deep inside a forward
        check_swin_stages(self.embed_dim, self.depths, self.num_heads,
                          "the pixel decoder reads strides 4, 8, 16 and 32")
        for key in ("feature_size", "mask_feature_size"):
            if getattr(self, key) % 32:
                raise UserError(
                    f"model.{key}={getattr(self, key)} is not a multiple of 32; the pixel decoder "
                    "normalises with GroupNorm(32 groups), so choose e.g. 64, 128 or 256."
                )
        for key in ("feature_size", "hidden_dim"):
            if getattr(self, key) % self.num_attention_heads:
                raise UserError(
                    f"model.{key}={getattr(self, key)} is not divisible by model.num_attention_heads="
                    f"{self.num_attention_heads}; pick a head count that divides both feature_size "
                    "and hidden_dim (e.g. 8 for 256)."
                )
        if self.decoder_layers < 1 or self.encoder_layers < 1:
            raise UserError(
                f"model.encoder_layers={self.encoder_layers} and model.decoder_layers="
                f"{self.decoder_layers} must be at least 1 (decoder_layers counts the query "
                "prediction too: 10 means 9 masked-attention layers, as published)."
            )
        if self.size_divisibility % 32:
            raise UserError(
                f"model.size_divisibility={self.size_divisibility} is not a multiple of 32, Swin's "
                "total stride; use 32 (or a multiple of it)."
            )
        if self.num_queries < 1 or self.test_topk_per_image < 1 or self.train_num_points < 1:
            raise UserError(
                "model.num_queries, model.test_topk_per_image and model.train_num_points must be "
                f"positive (got {self.num_queries}, {self.test_topk_per_image}, {self.train_num_points})."
            )


@register_family("mask2former", config=Mask2FormerConfig, family_map=FAMILY,
                 summary="transformers' Mask2Former (Swin, deformable-attention pixel decoder) as a detectron2 meta-arch")
# (no weight_layouts: those are WeightLayout objects the detectron2 loader asks to detect a
# state dict; a transformers checkpoint directory is read by `build` itself)
def build(cfg: Mask2FormerConfig, num_classes: int):
    import os

    from peftseg.models._mask2former import HFMask2Former, hf_config, load_transformers_dir
    from peftseg.models._mask2former_msda import set_deform_attn_impl

    model = HFMask2Former(
        hf_config(cfg, num_classes),
        pixel_mean=list(cfg.pixel_mean),
        pixel_std=list(cfg.pixel_std),
        input_format=cfg.input_format,
        size_divisibility=cfg.size_divisibility,
        test_topk_per_image=cfg.test_topk_per_image,
    )
    if cfg.weights and os.path.isdir(cfg.weights):
        # build_model sees this report and leaves the directory alone; a file goes through
        # the detectron2 loader there like any other family's checkpoint
        from peftseg.models.family import FACTS_ATTR, ModelFacts

        setattr(model, FACTS_ATTR, ModelFacts(FAMILY, weights=load_transformers_dir(model, cfg.weights, _HF)))
    set_deform_attn_impl(model, cfg.deform_attn_impl)
    return model
