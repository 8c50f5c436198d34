"""Dataset registration: a dataset config -> train/val names in Detectron2's catalogs.

Every dataset ends up as a COCO instances json + image folder per split, registered with
Detectron2's own `register_coco_instances`, after eager validation (validate.py) so that
bad paths or files fail with a UserError before any model is built.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from omegaconf import MISSING, DictConfig, OmegaConf

from peftseg.data.shapes import ShapesDatasetConfig, ensure_shapes
from peftseg.data.validate import check_split
from peftseg.errors import UserError

SPLITS = ("train", "val")


@dataclass
class CocoDatasetConfig:
    name: str = "coco"
    root: str = ""  # empty: $DETECTRON2_DATASETS/coco, DETECTRON2_DATASETS defaulting to datasets
    train_split: str = "train2017"
    val_split: str = "val2017"


@dataclass
class CocoFormatDatasetConfig:
    name: str = "coco_format"
    train_json: str = MISSING
    train_images: str = MISSING
    val_json: str = MISSING
    val_images: str = MISSING


@dataclass(frozen=True)
class DatasetSplits:
    train: str  # names in DatasetCatalog / MetadataCatalog
    val: str
    class_names: tuple[str, ...]
    root: str  # where the data lives, for humans


def _abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _publish(name: str, json_file: str, image_root: str, categories) -> None:
    # Replace, not add: a second registration may point the same name at other files, and
    # Detectron2 refuses both re-registration and changing metadata in place.
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, json_file, image_root)
    # Set now (load_coco_json sets the same values lazily) so that code reading the
    # metadata before the data is loaded, e.g. COCOEvaluator, already sees them.
    MetadataCatalog.get(name).set(
        thing_classes=[n for _, n in categories],
        thing_dataset_id_to_contiguous_id={cid: i for i, (cid, _) in enumerate(categories)},
    )


def _register(cfg, files: dict, root: str, fixes: dict) -> DatasetSplits:
    """files: split -> (json, image folder); fixes: split -> (how to fix json, images)."""
    categories = {
        split: check_split(json_file, image_root, split, *fixes[split])
        for split, (json_file, image_root) in files.items()
    }
    if categories["train"] != categories["val"]:
        raise UserError(
            f"The train and val annotation files ({files['train'][0]}, {files['val'][0]}) list "
            f"different categories: train has {list(categories['train'])}, val has "
            f"{list(categories['val'])} as (id, name). Both splits need the same 'categories' "
            "list; copy the train file's list into the val file (or the other way round)."
        )
    names = {split: f"peftseg_{cfg.name}_{split}" for split in SPLITS}
    for split, (json_file, image_root) in files.items():
        _publish(names[split], json_file, image_root, categories[split])
    return DatasetSplits(
        train=names["train"],
        val=names["val"],
        class_names=tuple(n for _, n in categories["train"]),
        root=root,
    )


def _register_shapes(cfg) -> DatasetSplits:
    root = ensure_shapes(cfg)
    fix = (
        f"The shapes cache at {root} was altered; delete that folder and it is regenerated."
    )
    files = {s: (os.path.join(root, f"{s}.json"), os.path.join(root, s)) for s in SPLITS}
    return _register(cfg, files, root, {s: (fix, fix) for s in SPLITS})


def _coco_root(cfg) -> tuple[str, str]:
    if cfg.root:
        return _abspath(cfg.root), f"dataset.root={cfg.root}"
    env = os.environ.get("DETECTRON2_DATASETS")
    why = f"DETECTRON2_DATASETS={env}" if env else "DETECTRON2_DATASETS is unset (so: datasets)"
    return _abspath(os.path.join(env or "datasets", "coco")), f"dataset.root is empty and {why}"


def _register_coco(cfg) -> DatasetSplits:
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
    return _register(cfg, files, root, {s: (layout, layout) for s in SPLITS})


def _missing(cfg, key: str) -> bool:
    try:
        return OmegaConf.is_missing(cfg, key) or not cfg[key]
    except KeyError:
        return True


def _register_coco_format(cfg) -> DatasetSplits:
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
    root = os.path.commonpath([p for pair in files.values() for p in pair])
    return _register(cfg, files, root, fixes)


def _placeholder(key: str) -> str:
    split, kind = key.split("_")
    return f"instances_{split}.json" if kind == "json" else f"{split}_images/"


_REGISTRARS = {
    "shapes": _register_shapes,
    "coco": _register_coco,
    "coco_format": _register_coco_format,
}


def _as_dictconfig(cfg) -> DictConfig:
    if isinstance(cfg, DictConfig):
        return cfg
    if dataclasses.is_dataclass(cfg) or isinstance(cfg, dict):
        return OmegaConf.structured(cfg)
    raise TypeError(f"register_dataset needs a dataset config, got {type(cfg).__name__}")


def register_dataset(cfg) -> DatasetSplits:
    """Validate the dataset `cfg` describes and register its train/val splits with Detectron2.

    `cfg` is a ShapesDatasetConfig, CocoDatasetConfig or CocoFormatDatasetConfig, as a
    dataclass or a DictConfig; `cfg.name` picks which. Safe to call again.
    """
    cfg = _as_dictconfig(cfg)
    name = cfg.get("name")
    if name not in _REGISTRARS:
        raise UserError(
            f"Unknown dataset name {name!r}. Known datasets: {', '.join(_REGISTRARS)}; pick "
            "one with dataset=<name> (e.g. dataset=shapes) and leave dataset.name as it is."
        )
    return _REGISTRARS[name](cfg)


__all__ = [
    "CocoDatasetConfig",
    "CocoFormatDatasetConfig",
    "DatasetSplits",
    "register_dataset",
]
