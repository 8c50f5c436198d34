"""Invariant 7: data as the ecosystem writes it. A COCO json without iscrowd/area trains and
evaluates (defaults counted in data_notes); duplicate categories, mixed image id types, a text
"iscrowd", a negative area are named before training; val json == train json is a note."""

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
