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


def test_predict_on_a_folder_skips_the_unreadable_image(member, shapes_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTSEG_CACHE", str(shapes_cache))
    images = tmp_path / "images"
    images.mkdir()
    val = sorted(shapes_cache.rglob("val/*.png"))[:2]
    for src in val:
        shutil.copy(src, images / src.name)
    (images / "broken.jpg").write_bytes(b"not an image at all")
    out = tmp_path / "pred"
    console = _console()
    rc = predict_main([f"checkpoint={member}", f"input={images}", f"output={out}", "score_thresh=0.0"], console)
    text = console.file.getvalue()
    assert rc == 0
    assert "broken.jpg" in text and "skipped 1 unreadable" in text
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in val)
    for png in out.glob("*.png"):
        assert Image.open(png).size == (512, 512)  # 128 px shapes drawn enlarged for legible labels
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
