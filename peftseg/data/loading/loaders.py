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

from peftseg.data.image_sizes import warn_if_oversized


class _NamingMapper(DatasetMapper):
    """detectron2's mapper; an image that fails to decode (truncated, damaged: validation
    reads headers only) fails with its file named instead of a bare PIL traceback."""

    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except (OSError, SyntaxError) as e:  # PIL's errors for bad image data (UnidentifiedImageError too)
            from peftseg.errors import UserError

            name = dataset_dict.get("file_name")
            raise UserError(
                f"image {name} (image id {dataset_dict.get('image_id')}) could not be decoded "
                f"({type(e).__name__}: {e}); it is truncated or damaged: replace the file, or remove the "
                "image and its annotations from the json."
            ) from None


def _mapper(is_train: bool, image_size: int, image_format: str, mask_format: str = "polygon") -> DatasetMapper:
    augs = [T.ResizeShortestEdge(image_size, max_size=image_size)]
    if is_train:
        augs.append(T.RandomFlip(horizontal=True))
    return _NamingMapper(
        is_train=is_train, augmentations=augs, image_format=image_format,
        # "bitmask" when the data has RLE masks (detectron2's polygon mode refuses them);
        # polygons convert to bitmasks too, so mixed data trains
        use_instance_mask=True, instance_mask_format=mask_format,
    )


def train_loader(name: str, image_size: int, image_format: str, batch_size: int, num_workers: int, seed: int,
                 skip: int = 0, mask_format: str = "polygon"):
    """`skip`: indices of this rank's sampler stream already trained on (a resumed run);
    `mask_format`: detectron2's instance_mask_format for the split (validate.SplitCheck)."""
    from peftseg.data.loading.resume_state import PositionedMapping, ResumedTrainingSampler

    dicts = get_detection_dataset_dicts([name], filter_empty=True)
    warn_if_oversized(dicts, image_size, "training")
    loader = build_detection_train_loader(
        # mapped here, not by detectron2's MapDataset: augmentations seeded by stream position
        dataset=PositionedMapping(dicts, _mapper(True, image_size, image_format, mask_format), seed), mapper=None,
        sampler=ResumedTrainingSampler(len(dicts), seed=seed, skip=skip),
        total_batch_size=batch_size, num_workers=num_workers, aspect_ratio_grouping=False,
    )
    return _leave_stops_to_the_main_process(loader)


def test_loader(name: str, image_size: int, image_format: str, num_workers: int):
    return _leave_stops_to_the_main_process(build_detection_test_loader(
        dataset=DatasetCatalog.get(name), mapper=_mapper(False, image_size, image_format),
        num_workers=num_workers,
    ))


def _ignore_stop_signals(init_fn, worker_id: int) -> None:
    import signal

    # the stops the main process turns into a checkpoint (peftseg.engine.interrupt.SIGNALS)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, signal.SIG_IGN)
    if init_fn is not None:
        init_fn(worker_id)


def _leave_stops_to_the_main_process(loader):
    """Data-loader workers ignore SIGTERM/SIGINT (and the scheduler's SIGUSR1/SIGUSR2). `timeout`, `scancel`, a SLURM time limit and
    Ctrl-C signal the whole process group: a worker that died of it made the main process
    fail with "DataLoader worker … killed by signal" before it could stop at a step boundary
    with a checkpoint. The main process decides; its loaders end their workers as usual (and
    torch's workers exit by themselves when the main process is gone)."""
    import functools

    loader.worker_init_fn = functools.partial(_ignore_stop_signals, loader.worker_init_fn)
    return loader
