"""`peftseg predict` and `peftseg visualize` on a run of the shared smoke sweep (in-process)."""

import io
import json
import shutil

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image
from rich.console import Console

from peftseg.errors import UserError
from peftseg.cli.predict import main as predict_main
from peftseg.cli.visualize import main as visualize_main


def _console():
    return Console(file=io.StringIO(), width=200)


@pytest.fixture(scope="module")
def member(smoke_sweep, shapes_cache, tmp_path_factory):
    """The first member of the shared 3-member sweep, and the shapes cache it was trained on."""
    _, sweep_dir = smoke_sweep
    return sweep_dir / "0-vitdet_tiny-adapter"


def test_predict_on_a_folder_skips_the_unreadable_image(member, shapes_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PEFTSEG_CACHE", str(shapes_cache))
    images = tmp_path / "images"
    images.mkdir()
    val = sorted(shapes_cache.rglob("val/*.png"))[:2]
    for src in val:
        shutil.copy(src, images / src.name)
    (images / "broken.jpg").write_bytes(b"not an image at all")
    (images / "notes.txt").write_text("where these photos come from")
    out = tmp_path / "pred"
    console = _console()
    rc = predict_main([f"checkpoint={member}", f"input={images}", f"output={out}", "score_thresh=0.0"], console)
    text = console.file.getvalue()
    assert rc == 0
    assert "broken.jpg" in text and "skipped 1 unreadable" in text
    # a file that is not an image by its suffix is named once, before anything runs
    assert f"skipped notes.txt in {images}: not an image (by the suffix" in text
    assert text.count("notes.txt") == 1 and text.index("notes.txt") < text.index("predicted")
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in val)
    for png in out.glob("*.png"):
        assert Image.open(png).size == Image.open(images / png.name).size == (128, 128)  # the input's own size
    # loading and the progress over the images go to stderr (not a terminal here: plain lines)
    progress = capsys.readouterr().err
    assert f"predict: loading {member}" in progress
    assert "predict: 1/3 images" in progress and "predict: 3/3 images" in progress and "ETA" in progress
    detections = json.loads((out / "predictions.json").read_text())
    assert detections, "score_thresh=0 keeps every detection of the model"
    for det in detections:
        assert det["category_id"] in (1, 2, 3) and 0.0 <= det["score"] <= 1.0 and len(det["bbox"]) == 4
        mask = mask_util.decode(det["segmentation"])
        assert mask.shape == (128, 128) and mask.dtype == np.uint8
    assert {d["file_name"] for d in detections} <= {str(images / p.name) for p in val}


def test_predict_names_what_is_missing(member, tmp_path):
    with pytest.raises(UserError, match="names no image"):
        predict_main([f"checkpoint={member}", f"input={tmp_path}/nothing*.png", f"output={tmp_path}"], _console())
    with pytest.raises(UserError, match=r"score_thresh=2 is out of range"):
        predict_main([f"checkpoint={member}", f"input={tmp_path}", "output=x", "score_thresh=2"], _console())
    with pytest.raises(UserError, match="no output given"):
        predict_main([f"checkpoint={member}", f"input={tmp_path}"], _console())


def test_visualize_draws_ground_truth_beside_predictions(member, shapes_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTSEG_CACHE", str(shapes_cache))
    out = tmp_path / "vis"
    assert visualize_main([str(member), "n=2", f"output={out}"], _console()) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    image = np.asarray(Image.open(pngs[0]).convert("RGB"))
    h, w, _ = image.shape
    assert w > 2 * 512 and h > 512  # two 512 px panels side by side, titles above
    # both panels carry the picture: neither half is blank
    assert image[:, : w // 2].std() > 10 and image[:, w // 2 :].std() > 10
    with pytest.raises(UserError, match="does not exist"):
        visualize_main([str(tmp_path), "n=2"], _console())


def test_labels_are_white_on_their_dark_box_even_on_a_black_image(monkeypatch):
    """The Visualizer draws a label in its mask's colour, brightened: dark blue became a blue that
    is hard to read on black. The label is white on the Visualizer's dark box whatever the colour."""
    import torch
    from detectron2.data import MetadataCatalog
    from detectron2.structures import Boxes, Instances
    from detectron2.utils import visualizer

    from peftseg.cli.predict import draw_overlay

    monkeypatch.setattr(visualizer, "random_color", lambda rgb=False, maximum=255: np.array([0.0, 0.0, 0.55]))
    black = np.zeros((128, 128, 3), np.uint8)
    found = Instances((128, 128), pred_boxes=Boxes(torch.tensor([[20.0, 30.0, 100.0, 110.0]])),
                      scores=torch.tensor([0.97]), pred_classes=torch.tensor([0]))
    found.pred_masks = torch.zeros(1, 128, 128, dtype=torch.bool)
    found.pred_masks[0, 40:100, 30:90] = True
    drawn = draw_overlay(black, found, MetadataCatalog.get("peftseg_test_labels").set(thing_classes=["circle"]))
    assert drawn.shape == black.shape  # drawn at the image's own size

    def luminance(rgb):  # WCAG relative luminance
        c = np.asarray(rgb, float) / 255
        return (np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4) @ [0.2126, 0.7152, 0.0722])

    # the mask and box are dark blue here: the grey-to-white pixels are the label's text
    ys, xs = np.nonzero(drawn.min(axis=2) > 128)
    assert len(ys) > 30, "no label text drawn in a readable colour"
    assert 25 <= ys.min() and ys.max() < 50 and 15 <= xs.min() < 30  # the label, at the box's top-left corner
    label = drawn[ys.min() - 1: ys.max() + 2, xs.min() - 1: xs.max() + 2].reshape(-1, 3)
    lum = luminance(label)
    contrast = (lum.max() + 0.05) / (lum.min() + 0.05)
    assert contrast >= 15, contrast  # WCAG's strictest level (AAA) asks 7:1 of body text
