"""Dataset contents are checked before a model is built: each problem named with file, id and
fix; harmless ones counted; RLE masks (both forms) accepted and trained as bitmasks."""

import copy
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.utils.events import EventStorage
from PIL import Image

from peftseg.data.shapes import generate_split
from peftseg.data.validate import check_split
from peftseg.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A 4-image 64px shapes split: (json path, image folder, its parsed json)."""
    root = tmp_path_factory.mktemp("validate")
    json_path = Path(generate_split(root, "train", 4, 64, 3, seed=0))
    return json_path, root / "train", json.loads(json_path.read_text())


def check(split, tmp_path, mutate=None, name="train"):
    json_path, images, coco = split
    coco = copy.deepcopy(coco)
    if mutate:
        mutate(coco, images)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return check_split(str(path), str(images), name, "FIXJSON", "FIXIMAGES")


def error(split, tmp_path, mutate, name="train") -> str:
    with pytest.raises(UserError) as e:
        check(split, tmp_path, mutate, name)
    return " ".join(str(e.value).split())


def first_ann(coco):
    return coco["annotations"][0]


def set_ann(key, value):
    return lambda c, _: first_ann(c).__setitem__(key, value)


def test_a_clean_split_passes_with_polygons(split, tmp_path):
    result = check(split, tmp_path)
    assert result.mask_format == "polygon" and result.notes == {}
    assert [n for _, n in result.categories] == ["circle", "square", "triangle"]


@pytest.mark.parametrize("mutate, needles", [
    (lambda c, _: c["images"][1].__setitem__("id", c["images"][0]["id"]), ["image ids", "more than once"]),
    (lambda c, _: c["annotations"][1].__setitem__("id", first_ann(c)["id"]), ["annotation ids", "unique id"]),
    (set_ann("image_id", 999), ["annotation id", "refers to an image id", "fix its image_id"]),
    (set_ann("category_id", 42), ["category_id 42", "add the category or fix the id"]),
    (lambda c, _: first_ann(c).pop("segmentation"), ["has no segmentation", "polygon or RLE"]),
    (set_ann("segmentation", [[1, 2, 3, 4]]), ["at least 3 points"]),
    (set_ann("segmentation", [[1, 2, float("nan"), 4, 5, 6]]), ["NaN or infinite"]),
    (set_ann("segmentation", "abc"), ["neither a list of polygons nor an RLE"]),
    (set_ann("segmentation", {"counts": "xx", "size": [10, 10]}), ["RLE mask of size [10, 10]"]),
    (set_ann("segmentation", {"counts": [5, 5], "size": [64, 64]}), ["do not add up to 64x64"]),
    (set_ann("bbox", [1, 2, 3]), ["4 finite numbers"]),
    (set_ann("bbox", [500, 500, 10, 10]), ["entirely outside its 64x64 image"]),
    (lambda c, _: c["images"][0].__setitem__("width", 65), ["is 64x64 but the json says 65x64"]),
    (lambda c, _: c["images"][0].pop("height"), ["no integer width/height", "width=64, height=64"]),
    (lambda c, _: c["images"][0].__setitem__("file_name", "../train.json"), ["point outside the image folder"]),
])
def test_each_problem_is_named_with_its_id_and_fix(split, tmp_path, mutate, needles):
    text = error(split, tmp_path, mutate)
    assert "train" in text
    for needle in needles:
        assert needle in text


def test_unreadable_sixteen_bit_and_rotated_images(split, tmp_path):
    _, _, coco = split
    folder = tmp_path / "images"
    folder.mkdir()
    names = [im["file_name"] for im in coco["images"]]
    src = split[1]
    for n in names:
        (folder / n).write_bytes((src / n).read_bytes())
    (folder / names[0]).write_bytes(b"not an image at all")
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(folder / names[1])  # mode I;16
    wide = Image.new("RGB", (64, 48))
    exif = wide.getexif()
    exif[0x0112] = 6  # rotate 90: loads as 48x64
    wide.save(folder / names[2], exif=exif)
    coco = copy.deepcopy(coco)
    coco["images"][2].update(width=64, height=48)
    path = tmp_path / "j.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(UserError) as e:
        check_split(str(path), str(folder), "train", "", "")
    text = " ".join(str(e.value).split())
    assert f"image id {coco['images'][0]['id']}" in text and "is not a readable image" in text
    assert "pixel mode 'I;16'" in text and "convert it to 8-bit" in text
    assert "EXIF orientation 6 rotates it to 48x64" in text and "set width=48, height=64" in text
    assert "problem(s)" in text


def test_val_without_annotations_is_refused(split, tmp_path):
    text = error(split, tmp_path, lambda c, _: c.__setitem__("annotations", []), name="val")
    assert "val split has no usable" in text


def test_harmless_problems_are_counted(split, tmp_path):
    def mutate(c, _):
        c["annotations"][0]["iscrowd"] = 1
        c["annotations"][1]["segmentation"].append([1, 2])  # a degenerate extra polygon
        x, y, w, h = c["annotations"][2]["bbox"]
        c["annotations"][2]["bbox"] = [x, y, w + 70, h]  # past the right edge
        img = c["annotations"][-1]["image_id"]
        c["annotations"] = [a for a in c["annotations"] if a["image_id"] != img]

    notes = check(split, tmp_path, mutate).notes
    assert notes == {
        "crowd annotations (ignored in training, as in COCO)": 1,
        "polygons with fewer than 3 points beside valid ones (dropped by detectron2)": 1,
        "boxes past the image edge (clipped by detectron2)": 1,
        "train images without annotations (skipped in training)": 1,
    }


def test_rle_in_both_forms_is_accepted_and_trains_as_bitmasks(split, tmp_path, model):
    from detectron2.data.datasets import load_coco_json

    from peftseg.data.loading.loaders import _mapper

    def to_rle(c, _):
        for i, ann in enumerate(c["annotations"]):
            rle = mask_util.merge(mask_util.frPyObjects(ann["segmentation"], 64, 64))
            if i % 2:  # uncompressed: run lengths as a list
                m = mask_util.decode(rle)
                flat = m.flatten(order="F")
                changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
                counts = np.diff(np.concatenate([[0], changes])).tolist()
                ann["segmentation"] = {"counts": counts, "size": [64, 64]}
            else:
                ann["segmentation"] = {"counts": rle["counts"].decode(), "size": [64, 64]}

    result = check(split, tmp_path, to_rle)
    assert result.mask_format == "bitmask"
    dicts = load_coco_json(str(tmp_path / "instances.json"), str(split[1]), dataset_name="peftseg_rle_test")
    mapper = _mapper(True, 64, "RGB", result.mask_format)
    batch = [mapper(d) for d in dicts[:2]]
    polygons = [p for p in batch[0]["instances"].gt_masks.tensor.sum((1, 2))]
    assert all(p > 0 for p in polygons)  # the masks decoded to pixels
    model.train()
    with EventStorage():
        losses = model(batch)
    assert torch.isfinite(losses["loss_mask"]) and losses["loss_mask"] > 0


def test_a_truncated_image_fails_in_the_loader_naming_the_file(split, tmp_path):
    from peftseg.data.loading.loaders import _mapper

    json_path, images, coco = split
    name = coco["images"][0]["file_name"]
    (tmp_path / name).write_bytes((images / name).read_bytes()[:200])  # the header survives
    check_split(str(json_path), str(images), "train", "", "")  # headers only: passes
    d = {"file_name": str(tmp_path / name), "image_id": 1, "height": 64, "width": 64, "annotations": []}
    with pytest.raises(UserError, match=rf"image .*{name} \(image id 1\) could not be decoded.*replace the file"):
        _mapper(True, 64, "RGB")(d)
