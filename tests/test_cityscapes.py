"""dataset=cityscapes on a tiny official-layout fixture the test writes: Detectron2's loader,
COCO-style mask AP and Cityscapes' own instance AP, refusals, a real run's record."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances
from PIL import Image

from cityscapes_fixture import write_cityscapes
from helpers import run_in_process
from peftseg.config import compose_config
from peftseg.data import register_splits
from peftseg.engine.evaluate import build_evaluator
from peftseg.errors import UserError

CLASSES = ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_cityscapes(tmp_path_factory.mktemp("cityscapes"))


def gt_file(d: dict, suffix: str) -> Path:
    """The gtFine file of a loaded image, e.g. suffix "_gtFine_polygons.json"."""
    return Path(d["file_name"].replace("/leftImg8bit/", "/gtFine/").replace("_leftImg8bit.png", suffix))


def splits_of(root):
    return register_splits(compose_config(["dataset=cityscapes", f"dataset.root={root}"]).dataset)


def test_detectron2_loader_reads_the_instances(root):
    splits = splits_of(root)
    assert splits.class_names == tuple(CLASSES)
    train, val = DatasetCatalog.get(splits.train), DatasetCatalog.get(splits.val)
    assert (len(train), len(val)) == (4, 2)
    meta = MetadataCatalog.get(splits.val)
    assert meta.evaluator_type == "cityscapes_instance" and meta.gt_dir == str(root / "gtFine" / "val")
    for d in train + val:  # every box of the json, road (stuff) left out; ids contiguous
        objects = json.loads(gt_file(d, "_gtFine_polygons.json").read_text())["objects"]
        wanted = sorted(CLASSES.index(o["label"]) for o in objects if o["label"] != "road")
        assert sorted(a["category_id"] for a in d["annotations"]) == wanted


def predictions_from_ground_truth(d, relabel=None):
    """The val image's instances exactly as its instanceIds png holds them, score 1."""
    from cityscapesscripts.helpers.labels import id2label

    ids_png = np.array(Image.open(gt_file(d, "_gtFine_instanceIds.png")))
    ids = [int(i) for i in np.unique(ids_png) if i >= 1000]
    masks = torch.tensor(np.stack([ids_png == i for i in ids]))
    instances = Instances((d["height"], d["width"]))
    instances.pred_masks = masks
    instances.pred_classes = torch.tensor([CLASSES.index(relabel or id2label[i // 1000].name) for i in ids])
    instances.scores = torch.ones(len(ids))
    boxes = []
    for m in masks.numpy():
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    return {"instances": instances}


@pytest.mark.parametrize("relabel", [None, "car"])
def test_both_aps_score_predictions(root, tmp_path, monkeypatch, relabel):
    monkeypatch.chdir(tmp_path)
    splits = splits_of(root)
    evaluator = build_evaluator(splits.val, tmp_path / "eval")
    evaluator.reset()
    for d in DatasetCatalog.get(splits.val):
        evaluator.process([d], [predictions_from_ground_truth(d, relabel)])
    results = evaluator.evaluate()
    assert set(results) == {"segm", "bbox", "cityscapes"}
    if relabel is None:  # the ground truth itself: perfect under both definitions
        assert results["segm"]["AP"] == pytest.approx(100.0)
        assert results["cityscapes"] == {"AP": pytest.approx(100.0), "AP50": pytest.approx(100.0)}
    else:  # every instance called a car: both drop
        assert results["segm"]["AP"] < 60 and results["cityscapes"]["AP"] < 60
    assert list(tmp_path.iterdir()) == [tmp_path / "eval"]  # nothing written into the cwd


def test_refusals_name_the_layout(root, tmp_path):
    with pytest.raises(UserError, match="No Cityscapes dataset at .*dataset.root=/path/to/cityscapes"):
        splits_of(tmp_path / "nowhere")
    broken = write_cityscapes(tmp_path / "broken", {"train": 1, "val": 1})
    gone = next((broken / "gtFine" / "val").rglob("*_gtFine_polygons.json"))
    gone.unlink()
    with pytest.raises(UserError, match=r"1 ground-truth file\(s\) of the Cityscapes val split are missing, e.g. .*polygons.json"):
        splits_of(broken)


def _first(root: Path, split: str, suffix: str) -> Path:
    return sorted((root / "gtFine" / split).rglob(f"*{suffix}"))[0]


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _truncate(root):
    path = _first(root, "train", "_gtFine_polygons.json")
    path.write_text(path.read_text()[:50])
    return [f"{path} is not valid JSON (Unterminated string starting at: line 1, column 50, char 49), a truncated "
            "or damaged file; unpack it again from gtFine_trainvaltest.zip"]


def _height(root):
    path = _first(root, "train", "_gtFine_polygons.json")
    _edit_json(path, lambda d: d.update(imgHeight=100))
    image = str(path).replace("/gtFine/", "/leftImg8bit/").replace("_gtFine_polygons.json", "_leftImg8bit.png")
    return [f"{path} says imgWidth x imgHeight = 256x100, but its image {image} is 256x128"]


def _instance_png(root):
    path = _first(root, "val", "_gtFine_instanceIds.png")
    Image.new("I;16", (128, 64)).save(path)
    return [f"{path} is 128x64, but its image", "is 256x128; restore the image and its gtFine files as released"]


def _label(root):
    path = _first(root, "val", "_gtFine_polygons.json")
    _edit_json(path, lambda d: d["objects"][1].update(label="automobile"))
    return [f"{path}: object 1 has label 'automobile', which is not a Cityscapes label", "The Cityscapes val split"]


def _points(root):
    path = _first(root, "train", "_gtFine_polygons.json")
    _edit_json(path, lambda d: d["objects"][1].update(polygon=[[1, 2], [3, 4]]))
    return [f"{path}: object 1 ('", "') has no polygon of at least 3 [x, y] points"]


def _no_val_instances(root):
    for path in (root / "gtFine" / "val").rglob("*_gtFine_polygons.json"):
        _edit_json(path, lambda d: d.update(objects=[o for o in d["objects"] if o["label"] == "road"]))
    return [f"The Cityscapes val split (dataset.val_split=val, {root / 'gtFine' / 'val'}) has no instance of the 8 "
            "instance classes (person, rider, car, truck, bus, train, motorcycle, bicycle) in its 1 polygons json "
            "file(s), so every AP would be undefined; point dataset.val_split at a split with annotations "
            "(Cityscapes' test split has none: its labels are withheld; evaluate on val)."]


def _only_crowds_in_train(root):
    for path in (root / "gtFine" / "train").rglob("*_gtFine_polygons.json"):
        _edit_json(path, lambda d: [o.update(label=o["label"] + "group") for o in d["objects"] if o["label"] != "road"])
    return ["The Cityscapes train split (dataset.train_split=train", "so there is nothing to train on"]


def _hidden_val_instances(root):
    # the loader resolves overlaps as Cityscapes draws them: a later polygon covers the earlier ones
    whole = [[0, 0], [255, 0], [255, 127], [0, 127]]
    for path in (root / "gtFine" / "val").rglob("*_gtFine_polygons.json"):
        _edit_json(path, lambda d: d["objects"].append({"label": "building", "polygon": whole}))
    return ["The Cityscapes val split (dataset.val_split=val", "in its 1 polygons json file(s) that shows (each one "
            "lies under a polygon listed after it, which Cityscapes draws on top), so every AP would be undefined"]


@pytest.mark.parametrize("damage", [_truncate, _height, _instance_png, _label, _points, _no_val_instances,
                                    _only_crowds_in_train, _hidden_val_instances])
def test_damaged_files_are_named_before_a_model_is_built(tmp_path, damage):
    """What the loader's process pool (a traceback naming no file) or training (a size mismatch
    mid-run, NaN AP at the end) met before is refused by register_splits, naming the file."""
    root = write_cityscapes(tmp_path / "cs", {"train": 1, "val": 1})
    needles = damage(root)
    with pytest.raises(UserError) as e:
        splits_of(root)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_a_run_records_coco_and_cityscapes_ap(root, tmp_path, shapes_cache):
    record = run_in_process(tmp_path, shapes_cache, "dataset=cityscapes", f"dataset.root={root}",
                            "method=heads", "train.max_iter=4", "train.warmup_iters=0", "model.score_thresh_test=0.0", "dataset.train_subset=3")
    assert record.ok
    assert record.data["train_images"] == 3 and record.data["train_images_available"] == 4
    for task in ("segm", "bbox", "cityscapes"):
        ap = record.metric(task)
        assert isinstance(ap, float) and 0 <= ap <= 100, (task, ap)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metrics"]["cityscapes"]["AP"] == record.metric("cityscapes")
    print("cityscapes fixture run:", {t: record.metric(t) for t in ("segm", "bbox", "cityscapes")})
