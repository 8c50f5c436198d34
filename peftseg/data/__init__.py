"""Datasets: one module per dataset kind, registering itself (peftseg.registry).

A dataset module declares its config dataclass and `register(cfg) -> DatasetSplits`
under `@register_dataset`; this package finds them by importing every public module in it
(modules named `_*` hold heavy implementation and are imported only when used).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from peftseg.registry import DATASETS, check_config

SPLITS = ("train", "val")


@dataclass(frozen=True)
class DatasetSplits:
    train: str  # names in DatasetCatalog / MetadataCatalog
    val: str
    class_names: tuple[str, ...]
    mask_format: str = "polygon"  # of the train split: "bitmask" when it has RLE masks
    notes: dict = dataclasses.field(default_factory=dict)  # harmless data problems: split -> kind -> count
    # set by dataset.train_subset (peftseg.data.subset): training images in the subset, and
    # the split's images the train loader would keep without it; None: the whole split
    train_images: int | None = None
    train_images_available: int | None = None


def _as_dictconfig(cfg) -> DictConfig:
    if isinstance(cfg, DictConfig):
        return cfg
    if dataclasses.is_dataclass(cfg) or isinstance(cfg, dict):
        return OmegaConf.structured(cfg)
    raise TypeError(f"register_splits needs a dataset config, got {type(cfg).__name__}")


def register_splits(cfg) -> DatasetSplits:
    """Validate the dataset `cfg` describes and register its train/val splits with Detectron2.

    `cfg` is a registered dataset config, as a dataclass or a DictConfig; `cfg.name` picks
    the dataset. Safe to call again.
    """
    cfg = _as_dictconfig(cfg)
    spec = DATASETS.get(cfg.get("name"))
    check_config(cfg)
    splits = spec.register(cfg)
    if cfg.get("train_subset"):  # every kind: the subset is cut from the registered train split
        from peftseg.data.subset import restrict_train_split

        splits = restrict_train_split(splits, cfg.train_subset, cfg.subset_seed)
    return splits


__all__ = ["DATASETS", "SPLITS", "DatasetSplits", "register_splits"]
