"""Detectron2 train/test loaders with the resize every model family here expects."""

from __future__ import annotations

from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import transforms as T
from detectron2.data.samplers import TrainingSampler

from peftseg.data.image_sizes import warn_if_oversized


def _mapper(is_train: bool, image_size: int, image_format: str) -> DatasetMapper:
    augs = [T.ResizeShortestEdge(image_size, max_size=image_size)]
    if is_train:
        augs.append(T.RandomFlip(horizontal=True))
    return DatasetMapper(
        is_train=is_train, augmentations=augs, image_format=image_format,
        use_instance_mask=True, instance_mask_format="polygon",
    )


def train_loader(name: str, image_size: int, image_format: str, batch_size: int, num_workers: int, seed: int):
    dicts = get_detection_dataset_dicts([name], filter_empty=True)
    warn_if_oversized(dicts, image_size, "training")
    return build_detection_train_loader(
        dataset=dicts, mapper=_mapper(True, image_size, image_format),
        sampler=TrainingSampler(len(dicts), seed=seed),
        total_batch_size=batch_size, num_workers=num_workers, aspect_ratio_grouping=False,
    )


def test_loader(name: str, image_size: int, image_format: str, num_workers: int):
    return build_detection_test_loader(
        dataset=DatasetCatalog.get(name), mapper=_mapper(False, image_size, image_format),
        num_workers=num_workers,
    )
