"""Dataset `cityscapes`: Cityscapes instance segmentation from the official `gtFine` layout,
read by Detectron2's own loader (detectron2.data.datasets.cityscapes), scored with COCO-style
mask AP and with Cityscapes' own instance AP (cityscapesScripts, through Detectron2's
CityscapesInstanceEvaluator; see peftseg.engine.evaluate).

Layout under the root (by default $DETECTRON2_DATASETS/cityscapes, as Detectron2 expects):
  leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
  gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_{instanceIds.png,labelIds.png,polygons.json}
The 8 instance classes are Cityscapes' (person, rider, car, truck, bus, train, motorcycle,
bicycle). Training reads the polygons json (Detectron2's default: overlaps resolved as
cityscapesScripts draws them); Cityscapes' AP compares against the instanceIds pngs.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import threading
from dataclasses import dataclass

from peftseg.data import DatasetSplits
from peftseg.data.subset import TrainSubsetOptions
from peftseg.errors import UserError
from peftseg.registry import register_dataset

IMAGE_SUFFIX = "_leftImg8bit.png"
GT_SUFFIXES = ("_gtFine_instanceIds.png", "_gtFine_labelIds.png", "_gtFine_polygons.json")
EVALUATOR = "cityscapes_instance"  # detectron2's evaluator_type for this data


@dataclass
class CityscapesDatasetConfig(TrainSubsetOptions):  # + train_subset, subset_seed
    name: str = "cityscapes"
    root: str = ""  # empty: $DETECTRON2_DATASETS/cityscapes, DETECTRON2_DATASETS defaulting to datasets
    train_split: str = "train"  # folders under leftImg8bit/ and gtFine/
    val_split: str = "val"


def _root(cfg) -> tuple[str, str]:
    if cfg.root:
        return os.path.abspath(os.path.expanduser(cfg.root)), f"dataset.root={cfg.root}"
    env = os.environ.get("DETECTRON2_DATASETS")
    why = f"DETECTRON2_DATASETS={env}" if env else "DETECTRON2_DATASETS is unset (so: datasets)"
    return os.path.abspath(os.path.join(env or "datasets", "cityscapes")), f"dataset.root is empty and {why}"


def check_split(root: str, split: str, layout: str) -> tuple[str, str, int]:
    """(image dir, gt dir, number of images) of one split; UserError naming what is missing."""
    image_dir, gt_dir = os.path.join(root, "leftImg8bit", split), os.path.join(root, "gtFine", split)
    for folder in (image_dir, gt_dir):
        if not os.path.isdir(folder):
            raise UserError(f"The Cityscapes {split} split has no folder {folder}. {layout}")
    images = sorted(glob.glob(os.path.join(image_dir, "*", "*" + IMAGE_SUFFIX)))
    if not images:
        raise UserError(
            f"No images in {image_dir}/<city>/*{IMAGE_SUFFIX} for the Cityscapes {split} split. {layout}"
        )
    stray = [p for c in os.listdir(image_dir) if os.path.isdir(os.path.join(image_dir, c))
             for p in os.listdir(os.path.join(image_dir, c)) if not p.endswith(IMAGE_SUFFIX)]
    if stray:  # detectron2's loader asserts on them
        raise UserError(
            f"{len(stray)} file(s) in the city folders of {image_dir} are not *{IMAGE_SUFFIX} images "
            f"(e.g. {stray[0]!r}); move them out, the loader reads every file there. {layout}"
        )
    missing = []
    for image in images:
        city = os.path.basename(os.path.dirname(image))
        stem = os.path.basename(image)[: -len(IMAGE_SUFFIX)]
        missing += [os.path.join(gt_dir, city, stem + s) for s in GT_SUFFIXES
                    if not os.path.isfile(os.path.join(gt_dir, city, stem + s))]
    if missing:
        raise UserError(
            f"{len(missing)} ground-truth file(s) of the Cityscapes {split} split are missing, e.g. "
            f"{missing[0]}: every image needs its gtFine instanceIds png, labelIds png and polygons "
            f"json. {layout}"
        )
    return image_dir, gt_dir, len(images)


def instance_classes() -> list[str]:
    """Cityscapes' instance classes in Detectron2's contiguous order (its loader's mapping)."""
    from cityscapesscripts.helpers.labels import labels

    return [label.name for label in labels if label.hasInstances and not label.ignoreInEval]


@contextlib.contextmanager
def _default_sigterm():
    """SIGTERM's default action while detectron2's loader runs: its multiprocessing pool is
    never closed and is finally terminated with SIGTERM; workers forked while a run's
    handler (peftseg.engine.interrupt) is installed would catch it instead of exiting, and
    the pool's join then hangs forever (seen in a run)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, saved)


def _publish(name: str, image_dir: str, gt_dir: str) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets.cityscapes import load_cityscapes_instances

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    # Parsed once, here (the catalog is read again by the subset, the loaders and both
    # evaluators), with default signal handling in the loader's forked process pool.
    with _default_sigterm():
        dicts = load_cityscapes_instances(image_dir, gt_dir, from_json=True, to_polygons=True)
    DatasetCatalog.register(name, lambda: dicts)
    # image_dir/gt_dir: what CityscapesInstanceEvaluator reads; as detectron2's builtin splits
    MetadataCatalog.get(name).set(thing_classes=instance_classes(), image_dir=image_dir, gt_dir=gt_dir,
                                  evaluator_type=EVALUATOR)


@register_dataset("cityscapes", config=CityscapesDatasetConfig, evaluator_type=EVALUATOR,
                  summary="Cityscapes gtFine instances (8 classes): COCO mask AP + Cityscapes AP")
def register_cityscapes(cfg) -> DatasetSplits:
    try:
        import cityscapesscripts  # noqa: F401  (labels for the loader, the evaluator's AP)
    except ImportError:
        raise UserError(
            "dataset=cityscapes needs the cityscapesScripts package (Cityscapes' label table and "
            "its instance AP); run scripts/setup.sh, or pip install --no-deps cityscapesscripts "
            "pyquaternion shapely."
        ) from None
    root, why = _root(cfg)
    layout = (
        f"The expected layout is {root}/leftImg8bit/<split>/<city>/*{IMAGE_SUFFIX} with "
        f"{root}/gtFine/<split>/<city>/*{{{','.join(s.lstrip('_') for s in GT_SUFFIXES)}}} beside "
        f"(splits {cfg.train_split} and {cfg.val_split}), as the official gtFine_trainvaltest.zip "
        "and leftImg8bit_trainvaltest.zip unpack. Set DETECTRON2_DATASETS to the folder that "
        "contains cityscapes/, or pass dataset.root=/path/to/cityscapes."
    )
    if not os.path.isdir(root):
        raise UserError(f"No Cityscapes dataset at {root} (looked there because {why}). {layout}")
    names = {}
    for split, folder in (("train", cfg.train_split), ("val", cfg.val_split)):
        image_dir, gt_dir, _ = check_split(root, folder, layout)
        names[split] = f"peftseg_{cfg.name}_{split}"
        _publish(names[split], image_dir, gt_dir)
    return DatasetSplits(train=names["train"], val=names["val"], class_names=tuple(instance_classes()),
                         mask_format="polygon")
