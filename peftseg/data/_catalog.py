"""Publishing validated splits in Detectron2's DatasetCatalog / MetadataCatalog.

Every dataset ends up as a COCO instances json + image folder per split, registered with
Detectron2's own `register_coco_instances`, after eager validation (validate.py) so that
bad paths or files fail with a UserError before any model is built. The dataset modules
(shapes.py, coco.py) call `publish_splits` from their registered `register` function.
"""

from __future__ import annotations


from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances

from peftseg.data import SPLITS, DatasetSplits
from peftseg.data.validate import check_split
from peftseg.errors import UserError


def _publish(name: str, json_file: str, image_root: str, categories, evaluator_type: str,
             needs_defaults: bool = False) -> None:
    # Replace, not add: a second registration may point the same name at other files, and
    # Detectron2 refuses both re-registration and changing metadata in place.
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    if needs_defaults:
        # register_coco_instances minus `json_file`: without it COCOEvaluator evaluates against
        # detectron2's convert_to_coco_json of these dicts, which fills iscrowd and area
        DatasetCatalog.register(name, lambda: load_coco_json(json_file, image_root, name))
        MetadataCatalog.get(name).set(image_root=image_root)
    else:
        register_coco_instances(name, {}, json_file, image_root)
    # Set now (load_coco_json sets the same values lazily) so that code reading the
    # metadata before the data is loaded, e.g. COCOEvaluator, already sees them.
    MetadataCatalog.get(name).set(
        thing_classes=[n for _, n in categories],
        thing_dataset_id_to_contiguous_id={cid: i for i, (cid, _) in enumerate(categories)},
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
    names = {split: f"peftseg_{cfg.name}_{split}" for split in SPLITS}
    for split, (json_file, image_root) in files.items():
        _publish(names[split], json_file, image_root, categories[split], _evaluator_type(cfg.name),
                 checks[split].needs_defaults)
    notes = {split: c.notes for split, c in checks.items() if c.notes}
    if _same_file(files["train"][0], files["val"][0]):
        notes.setdefault("val", {})["val json identical to the train json (AP measures fit to the training "
                                    "data, not generalisation)"] = 1
    return DatasetSplits(
        train=names["train"],
        val=names["val"],
        class_names=tuple(n for _, n in categories["train"]),
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
