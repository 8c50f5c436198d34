"""The SEEM meta-architecture (official `GeneralizedSEEM`, instance segmentation path):
detectron2 batched_inputs in, a loss dict (training) or Instances (inference) out, served by
detectron2's trainer and COCOEvaluator like every other family. Attribute names are the
official ones (backbone, sem_seg_head.pixel_decoder, sem_seg_head.predictor, criterion,
dilation_kernel), so released checkpoints load key for key.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import Boxes, ImageList, Instances

from peftseg.models._mask_boxes import mask_boxes
from peftseg.models._targets import padded_gt_masks
from peftseg.models._seem.criterion import HungarianMatcher, SetCriterion
from peftseg.models._seem.decoder import SEEMDecoder
from peftseg.models._seem.focal import D2FocalNet
from peftseg.models._seem.language import LanguageEncoder
from peftseg.models._seem.pixel_decoder import TransformerEncoderPixelDecoder


class XDecoderHead(nn.Module):
    """`sem_seg_head` (official `xdecoder_head`): the pixel decoder and the decoder."""

    def __init__(self, pixel_decoder: TransformerEncoderPixelDecoder, predictor: SEEMDecoder, num_classes: int):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor
        self.num_classes = num_classes

    def forward(self, features: dict[str, torch.Tensor]) -> dict:
        mask_features, multi_scale = self.pixel_decoder.forward_features(features)
        return self.predictor(multi_scale, mask_features)


# Not in detectron2's global META_ARCH_REGISTRY: the family's builder constructs it directly,
# and a global entry would clash with the official SEEM package's own in a process that
# imports both (e.g. to compare outputs against the official model).
class GeneralizedSEEM(nn.Module):
    def __init__(self, *, backbone: D2FocalNet, sem_seg_head: XDecoderHead, criterion: SetCriterion, pixel_mean,
                 pixel_std, size_divisibility: int, test_topk_per_image: int, input_format: str = "RGB"):
        super().__init__()
        self.input_format = input_format
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.size_divisibility = size_divisibility
        self.test_topk_per_image = test_topk_per_image
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # the official model's stroke-dilation kernel for interactive prompts: a persistent
        # buffer in the released checkpoints, unused by instance segmentation
        self.register_buffer("dilation_kernel", torch.ones(1, 1, 3, 3))

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def lang_encoder(self) -> LanguageEncoder:
        return self.sem_seg_head.predictor.lang_encoder

    def set_class_names(self, class_names: list[str]) -> None:
        """The dataset's classes: their text embeddings are computed here, once, and cached."""
        if len(class_names) != self.sem_seg_head.num_classes:
            raise ValueError(f"{len(class_names)} class names for a model built for {self.sem_seg_head.num_classes} classes")
        self.lang_encoder.set_class_names(list(class_names))

    def class_state(self) -> tuple:
        """What `set_class_names` computed (the names and their text embeddings), to restore
        later with `load_class_state` without another text forward."""
        return self.lang_encoder.class_state()

    def load_class_state(self, state: tuple) -> None:
        self.lang_encoder.load_class_state(state)

    def _check_class_names(self) -> None:
        if len(self.lang_encoder.class_names) != self.sem_seg_head.num_classes + 1:
            raise RuntimeError(
                "the seem model has no class text embeddings: call set_class_names(names) after "
                "building it (build_model does when it is given the dataset's class names)")

    def prepare_targets(self, batched_inputs, padded_hw) -> list[dict]:
        targets = []
        for x in batched_inputs:
            inst = x["instances"].to(self.device)
            padded = padded_gt_masks(inst, padded_hw, self.device)
            targets.append({"labels": inst.gt_classes.to(torch.int64), "masks": padded})
        return targets

    def forward(self, batched_inputs: list[dict]):
        self._check_class_names()
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.size_divisibility)
        features = self.backbone(images.tensor)
        outputs = self.sem_seg_head(features)
        if self.training:
            targets = self.prepare_targets(batched_inputs, tuple(images.tensor.shape[-2:]))
            return self.criterion(outputs, targets)
        return self.postprocess(outputs, batched_inputs, images)

    def postprocess(self, outputs: dict, batched_inputs, images: ImageList) -> list[dict]:
        masks = F.interpolate(outputs["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear", align_corners=False)
        results = []
        for logits, mask, x, size in zip(outputs["pred_logits"], masks, batched_inputs, images.image_sizes):
            height, width = x.get("height", size[0]), x.get("width", size[1])
            mask = sem_seg_postprocess(mask, size, height, width)
            results.append({"instances": self.instance_inference(logits.to(mask), mask)})
        return results

    def instance_inference(self, logits: torch.Tensor, mask_logits: torch.Tensor) -> Instances:
        """Softmax over classes + background (then dropped), top-k over queries x classes,
        score x mean mask probability inside the predicted mask (official recipe)."""
        scores = F.softmax(logits, dim=-1)[:, :-1]
        num_classes = scores.shape[-1]
        k = min(self.test_topk_per_image, scores.numel())
        top, flat = scores.flatten().topk(k, sorted=False)
        query = torch.div(flat, num_classes, rounding_mode="floor")
        mask_logits = mask_logits[query]
        binary = (mask_logits > 0).float()
        result = Instances(tuple(mask_logits.shape[-2:]))
        result.pred_masks = binary
        # detection is off in the released models: the official code fills zero boxes; boxes
        # around the masks serve detectron2's bbox evaluation better and change no mask result
        # (BitMasks.get_bounding_boxes' boxes, by tensor ops that an exported graph keeps)
        result.pred_boxes = Boxes(mask_boxes(binary))
        mask_scores = (mask_logits.sigmoid().flatten(1) * binary.flatten(1)).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        result.scores = top * mask_scores
        result.pred_classes = flat % num_classes
        return result


def build_seem(cfg, num_classes: int) -> GeneralizedSEEM:
    backbone = D2FocalNet(embed_dim=cfg.embed_dim, depths=list(cfg.depths), focal_levels=list(cfg.focal_levels),
                          focal_windows=list(cfg.focal_windows), mlp_ratio=cfg.mlp_ratio,
                          drop_path_rate=cfg.drop_path_rate, depthwise=cfg.backbone == "focal_dw")
    pixel_decoder = TransformerEncoderPixelDecoder(
        backbone.output_shape(), conv_dim=cfg.conv_dim, mask_dim=cfg.mask_dim, enc_layers=cfg.enc_layers,
        nheads=cfg.nheads, dim_feedforward=cfg.dim_feedforward, dropout=cfg.dropout)
    lang = LanguageEncoder(cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.dim_proj, cfg.context_length)
    predictor = SEEMDecoder(lang, hidden_dim=cfg.hidden_dim, dim_proj=cfg.dim_proj, num_queries=cfg.num_queries,
                            nheads=cfg.nheads, dim_feedforward=cfg.dim_feedforward, dec_layers=cfg.dec_layers,
                            mask_dim=cfg.mask_dim)
    matcher = HungarianMatcher(cfg.class_weight, cfg.mask_weight, cfg.dice_weight, cfg.train_num_points)
    criterion = SetCriterion(num_classes, matcher, {"ce": cfg.class_weight, "bce": cfg.mask_weight, "dice": cfg.dice_weight},
                             cfg.no_object_weight, cfg.train_num_points, cfg.oversample_ratio,
                             cfg.importance_sample_ratio)
    return GeneralizedSEEM(
        backbone=backbone, sem_seg_head=XDecoderHead(pixel_decoder, predictor, num_classes), criterion=criterion,
        pixel_mean=list(cfg.pixel_mean), pixel_std=list(cfg.pixel_std), size_divisibility=cfg.size_divisibility,
        test_topk_per_image=cfg.test_topk_per_image, input_format=cfg.input_format)
