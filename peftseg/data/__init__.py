"""Datasets: validation and registration with Detectron2, and the synthetic `shapes` data."""

from peftseg.data.register import (
    CocoDatasetConfig,
    CocoFormatDatasetConfig,
    DatasetSplits,
    register_dataset,
)
from peftseg.data.shapes import ShapesDatasetConfig

__all__ = [
    "CocoDatasetConfig",
    "CocoFormatDatasetConfig",
    "DatasetSplits",
    "ShapesDatasetConfig",
    "register_dataset",
]
