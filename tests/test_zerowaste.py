"""dataset=zerowaste: the ZeroWaste-f release layout and classes from dataset.root alone."""

import json
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from PIL import Image

from peftseg.config import compose_config
from peftseg.data import register_splits
from peftseg.errors import UserError
from peftseg.results import flatten_config

CLASSES = ["rigid_plastic", "cardboard", "metal", "soft_plastic"]


def write_zerowaste(root: Path, counts=None, classes=CLASSES) -> Path:
    """The release layout: <root>/<split>/labels.json (COCO, categories 1-4) + <split>/data/."""
    rng = np.random.default_rng(0)
    for split, n in (counts or {"train": 3, "val": 2, "test": 1}).items():
        (root / split / "data").mkdir(parents=True)
        images, annotations = [], []
        for i in range(n):
            name = f"{split}_{i:02d}.PNG"
            Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(root / split / "data" / name)
            images.append({"id": i + 1, "file_name": name, "height": 64, "width": 96})
            for k in range(2):
                x, y = 10 + 40 * k, 10
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i + 1, "category_id": 1 + (i + k) % 4,
                    "segmentation": [[x, y, x + 30, y, x + 30, y + 30, x, y + 30]],
                    "bbox": [x, y, 30, 30], "area": 900, "iscrowd": 0})
        (root / split / "labels.json").write_text(json.dumps({
            "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": c, "supercategory": "waste"} for i, c in enumerate(classes)]}))
    return root


def test_root_is_all_a_user_sets(tmp_path):
    root = write_zerowaste(tmp_path / "zerowaste-f-final")
    cfg = compose_config(["dataset=zerowaste", f"dataset.root={root}"])
    splits = register_splits(cfg.dataset)
    assert splits.class_names == tuple(CLASSES)
    assert (len(DatasetCatalog.get(splits.train)), len(DatasetCatalog.get(splits.val))) == (3, 2)
    flat = flatten_config(cfg)  # the record shows the paths the preset resolved
    assert flat["dataset.train_json"] == f"{root}/train/labels.json"
    assert flat["dataset.val_images"] == f"{root}/val/data"
    test = register_splits(compose_config(["dataset=zerowaste", f"dataset.root={root}",
                                            "dataset.val_split=test"]).dataset)
    assert len(DatasetCatalog.get(test.val)) == 1
    assert DatasetCatalog.get(test.val)[0]["file_name"] == str(root / "test" / "data" / "test_00.PNG")


def test_refusals(tmp_path):
    with pytest.raises(UserError, match="dataset=zerowaste needs dataset.root"):
        register_splits(compose_config(["dataset=zerowaste"]).dataset)
    other = write_zerowaste(tmp_path / "other", {"train": 1, "val": 1}, ["a", "b", "c", "d"])
    with pytest.raises(UserError, match=r"list the classes \['a', 'b', 'c', 'd'\], but ZeroWaste-f has"):
        register_splits(compose_config(["dataset=zerowaste", f"dataset.root={other}"]).dataset)
    with pytest.raises(UserError, match=r"nowhere does not hold the ZeroWaste-f release layout: .*/nowhere/train/labels.json is missing \(4 of the 4"):
        register_splits(compose_config(["dataset=zerowaste", f"dataset.root={tmp_path}/nowhere"]).dataset)


def test_a_roboflow_export_with_its_supercategory_at_id_0_keeps_the_four_classes(tmp_path):
    root = write_zerowaste(tmp_path / "zw")
    for split in ("train", "val", "test"):
        path = root / split / "labels.json"
        coco = json.loads(path.read_text())
        coco["categories"].insert(0, {"id": 0, "name": "waste", "supercategory": "none"})
        path.write_text(json.dumps(coco))
    splits = register_splits(compose_config(["dataset=zerowaste", f"dataset.root={root}"]).dataset)
    assert splits.class_names == tuple(CLASSES)  # not ("waste", *CLASSES): the ZeroWaste check passes
    dropped = ("supercategories no annotation uses, left out of the classes: 'waste' (id 0, parent of "
               "rigid_plastic, cardboard, metal, soft_plastic)")
    assert splits.notes["train"][dropped] == splits.notes["val"][dropped] == 1
    ids = {a["category_id"] for d in DatasetCatalog.get(splits.train) for a in d["annotations"]}
    assert ids == {0, 1, 2, 3}  # contiguous ids of the four classes
