"""Publishing validated splits in Detectron2's DatasetCatalog / MetadataCatalog.

Every dataset ends up as a COCO instances json + image folder per split, registered with
Detectron2's own `register_coco_instances`, after eager validation (validate.py) so that
bad paths or files fail with a UserError before any model is built. The classes are the
json's categories, but a supercategory that no annotation of either split uses (a Roboflow
export's category 0) is left out, and said so in the notes. The dataset modules (shapes.py,
coco.py) call `publish_splits` from their registered `register` function.
"""

from __future__ import annotations


from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances

from peftseg.data import SPLITS, DatasetSplits
from peftseg.data.validate import check_split
from peftseg.errors import UserError


def _load(json_file: str, image_root: str, id_map: dict) -> list[dict]:
    """load_coco_json with our class list: without a dataset name it neither sets the classes
    (every category of the json) nor maps the ids, so that is done here, with `id_map`."""
    dicts = load_coco_json(json_file, image_root)
    for d in dicts:
        for ann in d["annotations"]:
            ann["category_id"] = id_map[ann["category_id"]]
    return dicts


def _publish(name: str, json_file: str, image_root: str, categories, evaluator_type: str,
             from_dicts: bool = False) -> None:
    """`categories`: the classes, (id, name) sorted by id; all of the json's, or fewer when a
    supercategory no annotation uses was left out."""
    # Replace, not add: a second registration may point the same name at other files, and
    # Detectron2 refuses both re-registration and changing metadata in place.
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    id_map = {cid: i for i, (cid, _) in enumerate(categories)}
    if from_dicts:
        # register_coco_instances minus `json_file`: without it COCOEvaluator evaluates against
        # detectron2's convert_to_coco_json of these dicts, which fills iscrowd and area and
        # lists only our classes (COCOeval of the file would count a category left out)
        DatasetCatalog.register(name, lambda: _load(json_file, image_root, id_map))
        MetadataCatalog.get(name).set(image_root=image_root)
    else:
        register_coco_instances(name, {}, json_file, image_root)
    # Set now (load_coco_json sets the same values lazily) so that code reading the
    # metadata before the data is loaded, e.g. COCOEvaluator, already sees them.
    MetadataCatalog.get(name).set(
        thing_classes=[n for _, n in categories],
        thing_dataset_id_to_contiguous_id=id_map,
        evaluator_type=evaluator_type,  # detectron2's convention: which evaluator scores it
    )


def publish_splits(cfg, files: dict, fixes: dict) -> DatasetSplits:
    """files: split -> (json, image folder); fixes: split -> (how to fix json, images)."""
    checks = {
        split: check_split(json_file, image_root, split, *fixes[split])
        for split, (json_file, image_root) in files.items()
    }
    categories = {split: c.categories for split, c in checks.items()}
    if categories["train"] != categories["val"]:
        raise UserError(
            f"The train and val annotation files ({files['train'][0]}, {files['val'][0]}) list "
            f"different categories: train has {list(categories['train'])}, val has "
            f"{list(categories['val'])} as (id, name). Both splits need the same 'categories' "
            "list; copy the train file's list into the val file (or the other way round)."
        )
    notes = {split: dict(c.notes) for split, c in checks.items() if c.notes}
    # a supercategory no annotation of either split uses (Roboflow exports list the dataset as
    # category 0, parent of the real ones) is not a class: as one it would take a logit, a
    # query's class and a per-class AP of its own
    unused_in_both = set.intersection(*({cid for cid, _, _ in c.unused_parents} for c in checks.values()))
    dropped = [parent for parent in checks["train"].unused_parents if parent[0] in unused_in_both]
    classes = tuple(c for c in categories["train"] if c[0] not in unused_in_both)
    if dropped:
        kind = "supercategories no annotation uses, left out of the classes: " + "; ".join(
            f"{name!r} (id {cid}, parent of {', '.join(children)})" for cid, name, children in dropped)
        for split in SPLITS:
            notes.setdefault(split, {})[kind] = len(dropped)
    names = {split: f"peftseg_{cfg.name}_{split}" for split in SPLITS}
    for split, (json_file, image_root) in files.items():
        _publish(names[split], json_file, image_root, classes, _evaluator_type(cfg.name),
                 from_dicts=checks[split].needs_defaults or bool(dropped))
    if _same_file(files["train"][0], files["val"][0]):
        notes.setdefault("val", {})["val json identical to the train json (AP measures fit to the training "
                                    "data, not generalisation)"] = 1
    return DatasetSplits(
        train=names["train"],
        val=names["val"],
        class_names=tuple(n for _, n in classes),
        mask_format=checks["train"].mask_format,
        notes=notes,
    )


def _evaluator_type(dataset: str) -> str:
    from peftseg.registry import DATASETS

    return DATASETS.get(dataset).evaluator_type


def _same_file(a: str, b: str) -> bool:
    """One json for both splits (the same path, or byte-identical copies)."""
    import filecmp
    import os

    return os.path.realpath(a) == os.path.realpath(b) or filecmp.cmp(a, b, shallow=False)
