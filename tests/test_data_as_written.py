"""Invariant 7: data as the ecosystem writes it. A COCO json without iscrowd/area trains and
evaluates (defaults counted in data_notes); duplicate categories, mixed image id types, a text
"iscrowd", a negative area are named before training; val json == train json is a note;
categories no annotation uses are named in data_notes, and a Roboflow-style supercategory at
id 0 that no annotation uses is not a class."""

import copy
import json
from pathlib import Path

import pytest

from helpers import run_in_process
from peftseg.data.shapes import generate_split
from peftseg.data.validate import check_split
from peftseg.errors import UserError


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("as_written")
    json_path = Path(generate_split(root, "train", 4, 64, 3, seed=0))
    return json_path, root / "train", json.loads(json_path.read_text())


def _check(split, tmp_path, mutate):
    _, images, coco = split
    coco = copy.deepcopy(coco)
    mutate(coco)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return check_split(str(path), str(images), "val", "FIXJSON", "FIXIMAGES")


def _error(split, tmp_path, mutate) -> str:
    with pytest.raises(UserError) as e:
        _check(split, tmp_path, mutate)
    return " ".join(str(e.value).split())


def _dup_name(coco):
    coco["categories"][1]["name"] = coco["categories"][0]["name"]


def _dup_id(coco):
    coco["categories"].append(dict(coco["categories"][0], name="another"))


def _mixed_ids(coco):
    coco["images"][0]["id"] = str(coco["images"][0]["id"])
    for ann in coco["annotations"]:
        if ann["image_id"] == int(coco["images"][0]["id"]):
            ann["image_id"] = coco["images"][0]["id"]


@pytest.mark.parametrize("mutate, needles", [
    (_dup_name, ["duplicate categories", "categories are named", "AP disappears", "FIXJSON"]),
    (_dup_id, ["duplicate categories", "category id 1 is listed 2 times"]),
    (lambda c: c["categories"][0].__setitem__("id", "1"), ["category id '1' is not an integer"]),
    (_mixed_ids, ["image ids are of type(s) int, str", "as a number"]),
    (lambda c: c["annotations"][0].__setitem__("iscrowd", "0"), ["has iscrowd '0'", "the number 0 or 1"]),
    (lambda c: c["annotations"][0].__setitem__("area", -1), ["has area -1", "a number >= 0"]),
])
def test_each_case_is_named_before_training(split, tmp_path, mutate, needles):
    text = _error(split, tmp_path, mutate)
    for needle in needles:
        assert needle in text, (needle, text)


def _strip(coco):
    for ann in coco["annotations"]:
        ann.pop("iscrowd"), ann.pop("area")


def test_missing_iscrowd_and_area_are_counted_not_refused(split, tmp_path):
    checked = _check(split, tmp_path, _strip)
    n = len(split[2]["annotations"])
    assert checked.needs_defaults
    assert checked.notes["annotations without 'iscrowd' (0 assumed, as detectron2 does)"] == n
    assert checked.notes["annotations without 'area' (computed from the mask for evaluation)"] == n


def test_a_json_without_iscrowd_or_area_trains_and_evaluates(tmp_path, shapes_cache):
    """The converter-style json as both splits (so also: val == train is a note): a real run, ok, with AP."""
    root = tmp_path / "data"
    json_path = Path(generate_split(root, "val", 6, 64, 3, seed=1))
    coco = json.loads(json_path.read_text())
    _strip(coco)
    stripped = root / "stripped.json"
    stripped.write_text(json.dumps(coco))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = run_in_process(run_dir, shapes_cache, "dataset=coco_format", f"dataset.train_json={stripped}",
                            f"dataset.val_json={stripped}", f"dataset.train_images={root / 'val'}",
                            f"dataset.val_images={root / 'val'}", "model.image_size=64", "train.max_iter=2", "train.warmup_iters=0", "model.score_thresh_test=0.0",
                            "train.num_workers=0")
    assert record.status == "ok", record.error
    assert record.mask_ap is not None and 0 <= record.mask_ap <= 100
    n = len(coco["annotations"])
    assert record.data_notes["val"]["annotations without 'iscrowd' (0 assumed, as detectron2 does)"] == n
    assert record.data_notes["train"]["annotations without 'area' (computed from the mask for evaluation)"] == n
    assert any(k.startswith("val json identical to the train json") for k in record.data_notes["val"])


def _roboflow(coco):
    """As Roboflow exports COCO: the dataset itself as category 0, parent of the real classes."""
    coco["categories"] = [{"id": 0, "name": "shapes-abc", "supercategory": "none"}] + [
        dict(c, supercategory="shapes-abc") for c in coco["categories"]]


def test_unused_categories_are_named_and_an_unused_parent_is_reported(split, tmp_path):
    def extra(coco):
        _roboflow(coco)
        coco["categories"].append({"id": 9, "name": "hexagon", "supercategory": "shapes-abc"})

    checked = _check(split, tmp_path, extra)
    assert [n for _, n in checked.categories] == ["shapes-abc", "circle", "square", "triangle", "hexagon"]
    assert checked.notes == {"categories no annotation uses: 'shapes-abc' (id 0), 'hexagon' (id 9)": 2}
    assert checked.unused_parents == ((0, "shapes-abc", ("circle", "square", "triangle", "hexagon")),)


def test_a_roboflow_export_trains_without_a_phantom_class(tmp_path, shapes_cache):
    """Category 0 = the export's supercategory, used by no annotation: not a class (3 classes, not 4),
    said in data_notes; a real run on it trains and evaluates, per-class AP of the 3 real classes only."""
    root = tmp_path / "data"
    paths = {}
    for name, seed in (("train", 2), ("val", 3)):
        path = Path(generate_split(root, name, 4, 64, 3, seed=seed))
        coco = json.loads(path.read_text())
        _roboflow(coco)
        path.write_text(json.dumps(coco))
        paths[name] = path
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = run_in_process(run_dir, shapes_cache, "dataset=coco_format", f"dataset.train_json={paths['train']}",
                            f"dataset.val_json={paths['val']}", f"dataset.train_images={root / 'train'}",
                            f"dataset.val_images={root / 'val'}", "model.image_size=64", "train.max_iter=2",
                            "train.warmup_iters=0", "model.score_thresh_test=0.0", "train.num_workers=0")
    assert record.status == "ok", record.error
    dropped = ("supercategories no annotation uses, left out of the classes: 'shapes-abc' (id 0, parent of "
               "circle, square, triangle)")
    for name in ("train", "val"):
        assert record.data_notes[name]["categories no annotation uses: 'shapes-abc' (id 0)"] == 1
        assert record.data_notes[name][dropped] == 1
    per_class = sorted(k for k in record.metrics["segm"] if k.startswith("AP-"))
    assert per_class == ["AP-circle", "AP-square", "AP-triangle"]
    assert 0 <= record.mask_ap <= 100
    from safetensors import safe_open

    with safe_open(str(run_dir / "model_final.safetensors"), "pt") as f:  # the classes the checkpoint was trained on
        assert json.loads(f.metadata()["peftseg"])["class_names"] == ["circle", "square", "triangle"]
