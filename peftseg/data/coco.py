"""Datasets `coco` (the standard layout under $DETECTRON2_DATASETS/coco) and `coco_format`
(any COCO instances json + image folder per split)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from omegaconf import MISSING, OmegaConf

from peftseg.data import SPLITS, DatasetSplits
from peftseg.data.subset import TrainSubsetOptions
from peftseg.errors import UserError
from peftseg.registry import register_dataset


@dataclass
class CocoDatasetConfig(TrainSubsetOptions):  # + train_subset, subset_seed
    name: str = "coco"
    root: str = ""  # empty: $DETECTRON2_DATASETS/coco, DETECTRON2_DATASETS defaulting to datasets
    train_split: str = "train2017"
    val_split: str = "val2017"


@dataclass
class CocoFormatDatasetConfig(TrainSubsetOptions):  # + train_subset, subset_seed
    name: str = "coco_format"
    train_json: str = MISSING
    train_images: str = MISSING
    val_json: str = MISSING
    val_images: str = MISSING


def _abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _coco_root(cfg) -> tuple[str, str]:
    if cfg.root:
        return _abspath(cfg.root), f"dataset.root={cfg.root}"
    env = os.environ.get("DETECTRON2_DATASETS")
    why = f"DETECTRON2_DATASETS={env}" if env else "DETECTRON2_DATASETS is unset (so: datasets)"
    return _abspath(os.path.join(env or "datasets", "coco")), f"dataset.root is empty and {why}"


@register_dataset("coco", config=CocoDatasetConfig, summary="COCO 2017 under $DETECTRON2_DATASETS/coco")
def register_coco(cfg) -> DatasetSplits:
    from peftseg.data._catalog import publish_splits

    root, why = _coco_root(cfg)
    split_dirs = {"train": cfg.train_split, "val": cfg.val_split}
    layout = (
        f"The expected layout is {root}/annotations/instances_{{{cfg.train_split},"
        f"{cfg.val_split}}}.json and the image folders {root}/{{{cfg.train_split},"
        f"{cfg.val_split}}}/. Set DETECTRON2_DATASETS to the folder that contains coco/, "
        "or pass dataset.root=/path/to/coco."
    )
    if not os.path.isdir(root):
        raise UserError(f"No COCO dataset at {root} (looked there because {why}). {layout}")
    files = {
        s: (os.path.join(root, "annotations", f"instances_{d}.json"), os.path.join(root, d))
        for s, d in split_dirs.items()
    }
    return publish_splits(cfg, files, {s: (layout, layout) for s in SPLITS})


def _missing(cfg, key: str) -> bool:
    try:
        return OmegaConf.is_missing(cfg, key) or not cfg[key]
    except KeyError:
        return True


@register_dataset("coco_format", config=CocoFormatDatasetConfig,
                  summary="any COCO instances json + image folder per split")
def register_coco_format(cfg) -> DatasetSplits:
    from peftseg.data._catalog import publish_splits

    keys = [f"{s}_{kind}" for s in SPLITS for kind in ("json", "images")]
    missing = [k for k in keys if _missing(cfg, k)]
    if missing:
        raise UserError(
            f"The coco_format dataset needs a COCO instances json and an image folder per "
            f"split, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. "
            "Pass " + " ".join(f"dataset.{k}=/path/to/{_placeholder(k)}" for k in missing) + "."
        )
    files = {s: (_abspath(cfg[f"{s}_json"]), _abspath(cfg[f"{s}_images"])) for s in SPLITS}
    fixes = {
        s: (
            f"Pass the right file with dataset.{s}_json=/path/to/instances_{s}.json.",
            f"Pass the folder that holds the {s} images with dataset.{s}_images=/path/to/{s}/.",
        )
        for s in SPLITS
    }
    return publish_splits(cfg, files, fixes)


def _placeholder(key: str) -> str:
    split, kind = key.split("_")
    return f"instances_{split}.json" if kind == "json" else f"{split}_images/"
