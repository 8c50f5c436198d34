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

Before anything loads, every file of both splits is checked (`check_split`, `check_contents`):
what Detectron2's loader would meet in its process pool (a truncated json, an unknown label,
a polygon of two points: a traceback naming no file), what training would meet mid-run (an
`imgWidth`/`imgHeight` other than the image's) and what the evaluation would end in (a split
without instances: undefined AP) is refused with the file named.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import signal
import threading
from dataclasses import dataclass

from peftseg.data import DatasetSplits
from peftseg.data.images import pixel_problem, read_header
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


def _object_problem(obj, labels: dict) -> str | None:
    """Why one entry of a polygons json's `objects` would break detectron2's loader (None: it
    would not). The loader skips `deleted` objects and labels with a negative id, reads a
    `<label>group` as a crowd region of <label>, and builds a polygon of every other one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("label"), str):
        return "is not an object with a text 'label'"
    if "deleted" in obj:
        return None
    label = obj["label"]
    known = labels.get(label) or (labels.get(label[: -len("group")]) if label.endswith("group") else None)
    if known is None:
        return (f"has label {label!r}, which is not a Cityscapes label (cityscapesscripts.helpers.labels names "
                "them: car, person, cargroup, …)")
    if known.id < 0:
        return None
    polygon = obj.get("polygon")
    if not (isinstance(polygon, list) and len(polygon) >= 3 and all(
            isinstance(pt, list) and len(pt) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pt)
            for pt in polygon)):
        return f"({label!r}) has no polygon of at least 3 [x, y] points"
    return None


def _check_image(files: tuple[str, str, str, str], instance_labels: set, labels: dict) -> tuple[list[str], int]:
    """One image's problems (each naming its file) and its number of instances (objects of an
    instance class, crowd regions `…group` not counted)."""
    image, json_file, instance_png, label_png = files
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        return [f"{json_file} is not valid JSON ({e.msg}: line {e.lineno}, column {e.colno}, char {e.pos}), a "
                "truncated or damaged file; unpack it again from gtFine_trainvaltest.zip"], 0
    except UnicodeDecodeError as e:
        return [f"{json_file} is not UTF-8 text (byte {e.start}); unpack it again from gtFine_trainvaltest.zip"], 0
    except OSError as e:
        return [f"{json_file} cannot be read ({e.strerror or e})"], 0
    if not isinstance(data, dict) or not all(isinstance(data.get(k), int) and not isinstance(data.get(k), bool)
                                             for k in ("imgHeight", "imgWidth")) \
            or not isinstance(data.get("objects"), list):
        return [f"{json_file} is not a Cityscapes polygons json (an object with integer 'imgHeight', "
                "'imgWidth' and an 'objects' list); unpack it again from gtFine_trainvaltest.zip"], 0
    problems = []
    for i, obj in enumerate(data["objects"]):
        problem = _object_problem(obj, labels)
        if problem:
            problems.append(f"{json_file}: object {i} {problem}; fix or remove the object")
    instances = sum(1 for o in data["objects"] if isinstance(o, dict) and "deleted" not in o
                    and o.get("label") in instance_labels)
    size = (data["imgWidth"], data["imgHeight"])
    header = read_header(image)
    if isinstance(header, str):
        return problems + [f"{image} is not a readable image ({header}); replace the file"], instances
    problem = pixel_problem(header)  # the reader's rules for every image (data/images.py)
    if problem:
        problems.append(f"{image} {problem}")
    if (header.width, header.height) != size:
        problems.append(f"{json_file} says imgWidth x imgHeight = {size[0]}x{size[1]}, but its image {image} is "
                        f"{header.width}x{header.height}: the json belongs to another image or the image was "
                        "resized; restore the image and its gtFine files as released (the model resizes its "
                        "input itself: model.image_size)")
    for png in (instance_png, label_png):
        gt = read_header(png)
        if isinstance(gt, str):
            problems.append(f"{png} is not a readable image ({gt}); unpack it again from gtFine_trainvaltest.zip")
        elif (gt.width, gt.height) != (header.width, header.height):
            problems.append(f"{png} is {gt.width}x{gt.height}, but its image {image} is "
                            f"{header.width}x{header.height}; restore the image and its gtFine files as released")
    return problems, instances


def check_contents(image_dir: str, gt_dir: str, split: str, folder: str) -> None:
    """What detectron2's loader (in a process pool, naming no file) and training would trip over
    later: every polygons json parses, holds objects the loader reads, and has the image's size
    (as do the instanceIds/labelIds pngs); the split has instances at all. UserError listing the
    problems, each with its file. Headers only: no pixels are decoded."""
    from concurrent.futures import ThreadPoolExecutor

    from cityscapesscripts.helpers.labels import name2label

    from peftseg.data.validate import problem_list

    files = []
    for image in sorted(glob.glob(os.path.join(image_dir, "*", "*" + IMAGE_SUFFIX))):
        city, stem = os.path.basename(os.path.dirname(image)), os.path.basename(image)[: -len(IMAGE_SUFFIX)]
        gt = os.path.join(gt_dir, city, stem)
        files.append((image, gt + "_gtFine_polygons.json", gt + "_gtFine_instanceIds.png", gt + "_gtFine_labelIds.png"))
    classes = set(instance_classes())
    with ThreadPoolExecutor(min(16, len(files) // 64 + 1)) as pool:  # file reads overlap their waits
        results = list(pool.map(lambda f: _check_image(f, classes, name2label), files))
    problems = [p for found, _ in results for p in found]
    if problems:
        raise UserError(f"The Cityscapes {split} split (dataset.{split}_split={folder}, {gt_dir}) has "
                        f"{problem_list(problems)}")
    if not sum(n for _, n in results):
        raise UserError(empty_split(split, folder, gt_dir, len(files)))


def empty_split(split: str, folder: str, gt_dir: str, images: int, hidden: bool = False) -> str:
    where = (" that shows (each one lies under a polygon listed after it, which Cityscapes draws on top)"
             if hidden else "")
    use = ("every AP would be undefined; point dataset.val_split at a split with annotations (Cityscapes' "
           "test split has none: its labels are withheld; evaluate on val)") if split == "val" else (
           "there is nothing to train on; point dataset.train_split at a split with annotations")
    return (f"The Cityscapes {split} split (dataset.{split}_split={folder}, {gt_dir}) has no instance of the "
            f"{len(instance_classes())} instance classes ({', '.join(instance_classes())}) in its {images} "
            f"polygons json file(s){where}, so {use}.")


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


def _publish(name: str, image_dir: str, gt_dir: str, split: str, folder: str) -> None:
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
    if not any(not a["iscrowd"] for d in dicts for a in d["annotations"]):  # every instance hidden by overlaps
        raise UserError(empty_split(split, folder, gt_dir, len(dicts), hidden=True))
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
    dirs = {}
    for split, folder in (("train", cfg.train_split), ("val", cfg.val_split)):  # both checked before either loads
        image_dir, gt_dir, _ = check_split(root, folder, layout)
        check_contents(image_dir, gt_dir, split, folder)
        dirs[split] = (image_dir, gt_dir, folder)
    names = {}
    for split, (image_dir, gt_dir, folder) in dirs.items():
        names[split] = f"peftseg_{cfg.name}_{split}"
        _publish(names[split], image_dir, gt_dir, split, folder)
    return DatasetSplits(train=names["train"], val=names["val"], class_names=tuple(instance_classes()),
                         mask_format="polygon")
