"""Dataset `zerowaste`: ZeroWaste-f (Bashkirova et al., CVPR 2022; zenodo.org/record/4899927),
instance segmentation of recyclables on a sorting-plant conveyor, as a preset over
`coco_format`: the release's split layout and class names, so `dataset.root` is all a user sets.

Release layout (zerowaste-f-final.zip unpacked):
  <root>/{train,val,test}/labels.json   COCO instances json of the split
  <root>/{train,val,test}/data/         its images (file_name is relative to data/)
Classes (COCO category ids 1-4): rigid_plastic, cardboard, metal, soft_plastic.
The json and image paths are interpolations in conf/dataset/zerowaste.yaml
(`${.root}/${.train_split}/labels.json`, …), so each can still be overridden alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from peftseg.data import DatasetSplits
from peftseg.data.coco import CocoFormatDatasetConfig, register_coco_format
from peftseg.errors import UserError
from peftseg.registry import register_dataset

CLASSES = ("rigid_plastic", "cardboard", "metal", "soft_plastic")


@dataclass
class ZeroWasteDatasetConfig(CocoFormatDatasetConfig):
    name: str = "zerowaste"
    root: str = ""  # required: the unpacked zerowaste-f-final folder (holds train/, val/, test/)
    train_split: str = "train"
    val_split: str = "val"  # or test: the split the run evaluates on


@register_dataset("zerowaste", config=ZeroWasteDatasetConfig,
                  summary="ZeroWaste-f (4 recyclable classes) in its release layout under dataset.root")
def register_zerowaste(cfg) -> DatasetSplits:
    if not cfg.root:
        raise UserError(
            "dataset=zerowaste needs dataset.root: the unpacked ZeroWaste-f release folder, the one "
            "holding train/labels.json, train/data/, val/… and test/…; e.g. "
            "dataset.root=/data/zerowaste-f-final (download: https://zenodo.org/record/4899927)."
        )
    paths = [cfg.train_json, cfg.train_images, cfg.val_json, cfg.val_images]
    missing = [p for p in paths if not os.path.exists(os.path.expanduser(p))]
    if missing:
        raise UserError(
            f"dataset.root={cfg.root} does not hold the ZeroWaste-f release layout: {missing[0]} is "
            f"missing ({len(missing)} of the 4 split paths are). The release unpacks to "
            "<root>/{train,val,test}/labels.json with the images in <root>/<split>/data/; point "
            "dataset.root at that folder (splits: dataset.train_split, dataset.val_split)."
        )
    splits = register_coco_format(cfg)
    if tuple(splits.class_names) != CLASSES:
        raise UserError(
            f"The annotation files under dataset.root={cfg.root} list the classes "
            f"{list(splits.class_names)}, but ZeroWaste-f has {list(CLASSES)} (category ids 1-4); "
            "point dataset.root at the ZeroWaste-f release, or use dataset=coco_format for other data."
        )
    return splits
