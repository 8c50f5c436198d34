"""Invariant 4: one image reader (peftseg.data.images) with the same checks for training's
data validation, predict and visualize; predict refuses a plain checkpoint that does not fill
the model; max_size really raises the resolution."""

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file, save_file

from helpers import cli_in_process
from peftseg.data.images import read_image_checked
from peftseg.data.validate import check_split
from peftseg.errors import UserError


def _save(path, array=None, mode=None, size=(64, 48), **kw):
    image = Image.fromarray(array) if array is not None else Image.new(mode, size, **kw)
    image.save(path, **({"exif": kw.pop("exif")} if "exif" in kw else {}))
    return path


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    out = {
        "rgb": _save(d / "rgb.png", mode="RGB", size=(64, 48), color=(10, 200, 30)),
        "palette": _save(d / "palette.png", mode="P", size=(64, 48), color=3),
        "cmyk": _save(d / "cmyk.jpg", mode="CMYK", size=(64, 48), color=(255, 0, 255, 0)),
        "grey16": _save(d / "grey16.png", np.full((48, 64), 40000, np.uint16)),
        "float": _save(d / "float.tif", np.full((48, 64), 0.5, np.float32)),
        "strip": _save(d / "strip.png", mode="RGB", size=(1000, 2)),
        "tiny": _save(d / "tiny.png", mode="RGB", size=(4, 4)),
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: stored 64x48, seen 48x64
    Image.new("RGB", (64, 48), (1, 2, 3)).save(d / "exif.jpg", exif=exif)
    out["exif"] = d / "exif.jpg"
    return out


def test_the_reader_converts_what_converts_and_refuses_what_would_lie(images, monkeypatch):
    assert read_image_checked(images["rgb"], "RGB")[0, 0].tolist() == [10, 200, 30]
    assert read_image_checked(images["palette"], "RGB").shape == (48, 64, 3)
    cmyk = read_image_checked(images["cmyk"], "RGB")
    assert cmyk.shape == (48, 64, 3) and cmyk[0, 0, 0] < 50 and cmyk[0, 0, 1] > 200  # cyan + yellow ink: green
    assert read_image_checked(images["exif"], "BGR").shape == (64, 48, 3)  # EXIF orientation applied
    for key, needle in (("grey16", "pixel mode 'I;16'"), ("float", "pixel mode 'F'"),
                        ("strip", "1000x2 px, a degenerate size"), ("tiny", "4x4 px, a degenerate size")):
        with pytest.raises(ValueError, match=needle):
            read_image_checked(images[key], "RGB")
    monkeypatch.setattr("peftseg.data.images.MAX_PIXELS", 1000)
    with pytest.raises(ValueError, match="decompression-bomb"):
        read_image_checked(images["rgb"], "RGB")


def test_training_data_gets_the_same_checks(images, tmp_path):
    names = ["rgb", "grey16", "strip"]
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for i, name in enumerate(names, 1):
        w, h = Image.open(images[name]).size
        coco["images"].append({"id": i, "file_name": images[name].name, "width": w, "height": h})
        coco["annotations"].append({"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, 2, 1], "area": 2,
                                    "iscrowd": 0, "segmentation": [[0, 0, 2, 0, 2, 1, 0, 1]]})
    path = tmp_path / "train.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(UserError) as err:
        check_split(str(path), str(images["rgb"].parent), "train", "", "")
    text = str(err.value)
    assert "2 problem(s)" in text and "pixel mode 'I;16'" in text and "1000x2 px, a degenerate size" in text


def test_predict_refuses_what_training_refuses(finished_lora_run, shapes_cache, images, tmp_path):
    for key, needle in (("grey16", "pixel mode 'I;16'"), ("strip", "1000x2 px")):
        proc = cli_in_process("predict", f"checkpoint={finished_lora_run}", f"input={images[key]}",
                              f"output={tmp_path / key}", cwd=tmp_path, cache=shapes_cache)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert needle in proc.stderr and "Traceback" not in proc.stderr
        assert not list((tmp_path / key).glob("*.png"))


def test_max_size_really_raises_the_resolution(finished_lora_run, shapes_cache, tmp_path, monkeypatch):
    from peftseg.checkpoint.load import load_model
    from peftseg.cli.predict import predict

    monkeypatch.setenv("PEFTSEG_CACHE", str(shapes_cache))
    src = sorted(shapes_cache.rglob("val/*.png"))[0]
    big = tmp_path / "big.png"
    Image.open(src).convert("RGB").resize((512, 384)).save(big)
    loaded = load_model(str(finished_lora_run), [])
    seen = []
    forward = loaded.model.forward
    monkeypatch.setattr(loaded.model, "forward", lambda batch: seen.append(batch[0]["image"].shape) or forward(batch))
    console = Console(file=io.StringIO())
    predict(loaded, [big], tmp_path / "at_default", console=console)
    predict(loaded, [big], tmp_path / "at_512", max_size=512, console=console)
    image_size = int(loaded.cfg.model.image_size)
    assert max(seen[0][1:]) == image_size
    assert tuple(seen[1][1:]) == (384, 512)  # long side 512, as asked, not image_size


def test_predict_refuses_a_plain_checkpoint_that_does_not_fill_the_model(finished_lora_run, shapes_cache, tmp_path):
    # the merged model minus its heads: what a backbone-only (e.g. ImageNet) file looks like to the loader
    merged = tmp_path / "merged.safetensors"
    proc = cli_in_process("merge", f"checkpoint={finished_lora_run}", f"output={merged}", cwd=tmp_path,
                          cache=shapes_cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    backbone = {k: v for k, v in load_file(merged).items() if k.startswith("backbone.")}
    save_file(backbone, tmp_path / "backbone_only.safetensors")
    src = sorted(shapes_cache.rglob("val/*.png"))[0]
    shutil.copy(src, tmp_path / "x.png")
    proc = cli_in_process("predict", f"checkpoint={tmp_path / 'backbone_only.safetensors'}", "model=vitdet_tiny",
                          "classes=[a,b,c]", f"input={tmp_path / 'x.png'}", f"output={tmp_path / 'p'}",
                          cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "does not hold the whole vitdet_tiny model" in proc.stderr and "roi_heads" in proc.stderr
    assert not (tmp_path / "p").exists()
