"""The heavy half of family `mask2former` (mask2former.py holds its config, map and
registration): the detectron2 meta-arch around transformers' model, and the loader of
transformers checkpoint directories."""

from __future__ import annotations

import copy
import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from transformers import Mask2FormerConfig as HFMask2FormerConfig
from transformers import Mask2FormerForUniversalSegmentation, SwinConfig
from transformers.utils import logging as hf_logging

from peftseg.models._mask_boxes import mask_boxes
from peftseg.models._targets import padded_gt_masks
from peftseg.errors import UserError
from peftseg.models._weights import LoadReport

log = logging.getLogger(__name__)


def hf_config(cfg, num_classes: int) -> HFMask2FormerConfig:  # cfg: a Mask2FormerConfig
    """The transformers config this preset describes (num_labels = the dataset's classes)."""
    swin = SwinConfig(
        embed_dim=cfg.embed_dim,
        depths=list(cfg.depths),
        num_heads=list(cfg.num_heads),
        window_size=cfg.window_size,
        mlp_ratio=cfg.mlp_ratio,
        drop_path_rate=cfg.drop_path_rate,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return HFMask2FormerConfig(
        backbone_config=swin,
        num_labels=num_classes,
        feature_size=cfg.feature_size,
        mask_feature_size=cfg.mask_feature_size,
        hidden_dim=cfg.hidden_dim,
        encoder_layers=cfg.encoder_layers,
        encoder_feedforward_dim=cfg.encoder_feedforward_dim,
        decoder_layers=cfg.decoder_layers,
        num_attention_heads=cfg.num_attention_heads,
        dim_feedforward=cfg.dim_feedforward,
        num_queries=cfg.num_queries,
        dropout=cfg.dropout,
        pre_norm=cfg.pre_norm,
        class_weight=cfg.class_weight,
        mask_weight=cfg.mask_weight,
        dice_weight=cfg.dice_weight,
        no_object_weight=cfg.no_object_weight,
        train_num_points=cfg.train_num_points,
        oversample_ratio=cfg.oversample_ratio,
        importance_sample_ratio=cfg.importance_sample_ratio,
    )


# Not in detectron2's global META_ARCH_REGISTRY: the family's builder constructs it directly,
# and a global entry would clash with another package's "HFMask2Former" in a process that
# imports both (e.g. to compare outputs against the official model).
class HFMask2Former(nn.Module):
    """transformers' Mask2FormerForUniversalSegmentation behind detectron2's model interface."""

    def __init__(self, config: HFMask2FormerConfig, *, pixel_mean, pixel_std, input_format: str = "RGB",
                 size_divisibility: int = 32, test_topk_per_image: int = 100):
        super().__init__()
        self.m2f = Mask2FormerForUniversalSegmentation(config)
        # SwinBackbone keeps SwinModel's final LayerNorm, whose output it never uses: a
        # trainable parameter without gradient, which DDP rejects under full fine-tuning
        self.m2f.model.pixel_level_module.encoder.swin.layernorm = nn.Identity()
        self.input_format = input_format
        self.size_divisibility = size_divisibility
        self.test_topk_per_image = test_topk_per_image
        # non-persistent, as in GeneralizedRCNN: a config value, not a learned weight
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: list[dict]) -> ImageList:
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    def targets(self, batched_inputs: list[dict], padded_hw: tuple[int, int]):
        """mask_labels (float masks padded like the image batch) and class_labels per image."""
        mask_labels, class_labels = [], []
        for x in batched_inputs:
            inst = x["instances"]
            padded = padded_gt_masks(inst, padded_hw, self.device)
            mask_labels.append(padded)
            class_labels.append(inst.gt_classes.to(self.device, torch.int64))
        return mask_labels, class_labels

    def losses(self, pixel_values: torch.Tensor, mask_labels, class_labels) -> dict[str, torch.Tensor]:
        """transformers' loss dict: loss_{cross_entropy,mask,dice} of the last layer and the
        same with suffix _i for each auxiliary prediction, each already multiplied by its
        weight; their sum is exactly the `loss` the transformers model returns."""
        out = self.m2f(pixel_values=pixel_values, output_auxiliary_logits=True)
        return self.m2f.get_loss_dict(
            masks_queries_logits=out.masks_queries_logits,
            class_queries_logits=out.class_queries_logits,
            mask_labels=mask_labels,
            class_labels=class_labels,
            auxiliary_predictions=out.auxiliary_logits,
        )

    def forward(self, batched_inputs: list[dict]):
        images = self.preprocess_image(batched_inputs)
        if self.training:
            mask_labels, class_labels = self.targets(batched_inputs, tuple(images.tensor.shape[-2:]))
            return self.losses(images.tensor, mask_labels, class_labels)
        out = self.m2f(pixel_values=images.tensor)
        # predicted at stride 4 of the padded batch: back to padded pixels, then per image
        # crop the padding and resize to the original size (detectron2's sem_seg_postprocess)
        mask_logits = F.interpolate(
            out.masks_queries_logits, size=images.tensor.shape[-2:], mode="bilinear", align_corners=False
        )
        results = []
        for cls, masks, x, size in zip(out.class_queries_logits, mask_logits, batched_inputs, images.image_sizes):
            height, width = x.get("height", size[0]), x.get("width", size[1])
            masks = sem_seg_postprocess(masks, size, height, width)
            results.append({"instances": self.instance_inference(cls, masks)})
        return results

    def instance_inference(self, class_logits: torch.Tensor, mask_logits: torch.Tensor) -> Instances:
        """Mask2Former's instance inference (as in transformers' post_process_instance_segmentation,
        without its fixed 384 px resize and score threshold, which COCO AP must not have): top-k
        over queries x classes, score = class probability x mean mask probability inside the mask."""
        num_classes = class_logits.shape[-1] - 1
        probs = class_logits.softmax(-1)[:, :-1]
        k = min(self.test_topk_per_image, probs.numel())
        scores, flat = probs.flatten().topk(k, sorted=False)
        query = torch.div(flat, num_classes, rounding_mode="floor")
        logits = mask_logits[query]
        masks = logits > 0
        inside = masks.flatten(1).float()
        mask_scores = (logits.sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)
        result = Instances(tuple(mask_logits.shape[-2:]))
        result.pred_masks = masks
        # BitMasks.get_bounding_boxes' boxes, by tensor ops that an exported graph keeps
        result.pred_boxes = Boxes(mask_boxes(masks))
        result.scores = scores * mask_scores
        result.pred_classes = flat % num_classes
        return result


def load_transformers_dir(model: HFMask2Former, path: str, prefix: str) -> LoadReport:
    """Load a transformers Mask2Former checkpoint directory into `model` (non-strict); `prefix`:
    where the wrapper holds the transformers model (reported key names carry it).

    transformers reads it (safetensors or .bin, sharded or not, and its own renames of
    older checkpoints' keys) into a model of *this* config; what matched by name and shape is
    copied over. A different num_labels leaves class_predictor (and the criterion's class
    weights) at their init and shows up as shape mismatches, which is expected.
    """
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(
            f"model.weights={path!r} is a directory without config.json, so it is not a "
            "transformers checkpoint; point model.weights at a directory written by "
            "save_pretrained (config.json + model.safetensors), e.g. a local copy of "
            "facebook/mask2former-swin-tiny-coco-instance, or at a detectron2 .pth file."
        )
    # our report below replaces transformers' own load table and progress bar
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        source, info = Mask2FormerForUniversalSegmentation.from_pretrained(
            path, config=copy.deepcopy(model.m2f.config), ignore_mismatched_sizes=True,
            output_loading_info=True, local_files_only=True,
        )
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(
            f"model.weights={path!r} could not be read as a transformers checkpoint "
            f"({type(e).__name__}: {e}); give a directory written by save_pretrained with its "
            "config.json and model.safetensors (or pytorch_model.bin)."
        ) from e
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    mismatched = {k for k, *_ in info["mismatched_keys"]}
    absent = set(info["missing_keys"]) | mismatched
    ours = model.m2f.state_dict()
    theirs = source.state_dict()
    loaded = {k: v for k, v in theirs.items() if k in ours and k not in absent and v.shape == ours[k].shape}
    model.m2f.load_state_dict(loaded, strict=False)
    # read from the file but without a place here (e.g. the Swin final norm this wrapper drops)
    unused = {k for k in theirs if k not in ours and k not in absent}
    report = LoadReport(
        source=path,
        loaded=tuple(prefix + k for k in loaded),
        missing=tuple(prefix + k for k in ours if k not in loaded),
        unexpected=tuple(sorted(set(info["unexpected_keys"]) | unused)),
        shape_mismatch=tuple(prefix + k for k in sorted(mismatched)),
    )
    log.info(report.summary())
    if not report.loaded:
        raise UserError(
            f"model.weights={path!r} matched no parameter of this Mask2Former model "
            f"({len(report.unexpected)} checkpoint keys have no counterpart, "
            f"{len(report.shape_mismatch)} differ in shape, e.g. {list(report.shape_mismatch[:3])}); "
            "use a Mask2Former checkpoint whose backbone and decoder sizes match this model "
            "preset (model.embed_dim, depths, num_heads, feature_size, hidden_dim, …)."
        )
    _check_backbone_complete(path, report, prefix)
    return report


_BACKBONE_CKPT = "model.pixel_level_module.encoder."
_UNUSED_SWIN_NORM = _BACKBONE_CKPT + "swin.layernorm."


def _check_backbone_complete(path: str, report: LoadReport, prefix: str) -> None:
    """Methods freeze the backbone, so it must come from the checkpoint whole: a tensor left at
    its init (other shape, or absent) or one the checkpoint has beyond ours (more blocks) means
    the checkpoint was made for another Swin, as the detectron2 loader also refuses."""
    absent = [k for k in report.missing if k.startswith(prefix + _BACKBONE_CKPT)]
    extra = [k for k in report.unexpected if k.startswith(_BACKBONE_CKPT) and not k.startswith(_UNUSED_SWIN_NORM)]
    if not absent and not extra:
        return
    example = (absent or extra)[0]
    raise UserError(
        f"model.weights={path!r} does not fit this model's Swin backbone: {len(absent)} backbone "
        f"tensors are missing or differ in shape and {len(extra)} are left over (e.g. {example}), "
        "so the checkpoint was made for another Swin; set model.embed_dim, depths, num_heads and "
        "window_size to the backbone_config in its config.json (m2f_swin_t matches "
        "facebook/mask2former-swin-tiny-coco-instance)."
    )
