"""Invariant 2: outputs never destroy inputs — one guard (peftseg.io.output_guard), tested
through every command that writes: predict, visualize, merge, eval output=, report."""

import hashlib
import io
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from helpers import cli_in_process
from peftseg.errors import UserError
from peftseg.io.output_guard import distinct_names, output_file
from test_finite import _record


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run_dir(finished_lora_run):
    return finished_lora_run


def _cli(run_dir, shapes_cache, *args):
    proc = cli_in_process(*args, cwd=run_dir.parent, cache=shapes_cache)
    return proc.returncode, proc.stdout + proc.stderr


def _refused(result, *needles):
    code, text = result
    assert code == 2, text
    assert "Traceback" not in text
    for needle in needles:
        assert needle in text, (needle, text)


@pytest.fixture
def photos(tmp_path, shapes_cache):
    """Two val images sharing one stem (a.png, a.jpg) and one more, in a folder of their own."""
    folder = tmp_path / "photos"
    folder.mkdir()
    src = sorted(shapes_cache.rglob("val/*.png"))[:2]
    shutil.copy(src[0], folder / "a.png")
    Image.open(src[1]).convert("RGB").save(folder / "a.jpg", quality=95)
    shutil.copy(src[1], folder / "b.png")
    return folder


def test_predict_never_writes_over_its_input_or_the_run(run_dir, shapes_cache, photos, tmp_path):
    before, run_before = _digest(photos), _digest(run_dir)
    ck = f"checkpoint={run_dir}"
    _refused(_cli(run_dir, shapes_cache, "predict", ck, f"input={photos}", f"output={photos}"), "is the input itself")
    _refused(_cli(run_dir, shapes_cache, "predict", ck, f"input={photos}", f"output={photos}/sub"), "inside the input")
    _refused(_cli(run_dir, shapes_cache, "predict", ck, f"input={photos / 'a.png'}", f"output={photos / 'a.png'}"),
             "is a file")
    _refused(_cli(run_dir, shapes_cache, "predict", ck, f"input={photos}", f"output={run_dir / 'peft'}"),
             "the run's own 'peft'")
    _refused(_cli(run_dir, shapes_cache, "predict", ck, f"input={photos}", "output=/dev/null"),
             "device, pipe or socket")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    _refused(_cli(run_dir, shapes_cache, "predict", ck, f"input={photos}", f"output={tmp_path / 'link'}"),
             "symbolic link")
    (tmp_path / "plain").write_text("x")
    _refused(_cli(run_dir, shapes_cache, "predict", ck, f"input={photos}", f"output={tmp_path / 'plain' / 'sub'}"),
             "could not write")
    assert _digest(photos) == before and _digest(run_dir) == run_before
    # two inputs with one stem get two overlays, not one overwriting the other
    code, text = _cli(run_dir, shapes_cache, "predict", ck, f"input={photos}", f"output={tmp_path / 'out'}")
    assert code == 0, text
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["a_jpg.png", "a_png.png", "b.png"]


def test_distinct_names_for_one_stem_in_two_folders():
    names = distinct_names([Path("d1/a.jpg"), Path("d2/a.jpg"), Path("d1/a.png"), Path("c.png")], ".png")
    assert list(names.values()) == ["a_jpg.png", "a_jpg-2.png", "a_png.png", "c.png"]


def test_visualize_never_writes_into_the_images_or_the_run(run_dir, shapes_cache, monkeypatch):
    from detectron2.data import MetadataCatalog

    from peftseg.cli.visualize import run_config
    from peftseg.data import register_dataset

    # the run's own validation images (the session's cache may hold other shapes datasets too)
    monkeypatch.setenv("PEFTSEG_CACHE", str(shapes_cache))
    splits = register_dataset(run_config(run_dir)[0]["dataset"])
    val_folder = Path(MetadataCatalog.get(splits.val).image_root)
    before = _digest(val_folder)
    _refused(_cli(run_dir, shapes_cache, "visualize", str(run_dir), "n=1", f"output={val_folder / 'vis'}"),
             "inside the input folder")
    _refused(_cli(run_dir, shapes_cache, "visualize", str(run_dir), "n=1", f"output={run_dir / '.hydra'}"),
             "the run's own '.hydra'")
    assert _digest(val_folder) == before


def test_merge_refuses_the_runs_own_checkpoint_and_unknown_formats(run_dir, shapes_cache):
    final = run_dir / "model_final.safetensors"
    digest = hashlib.sha256(final.read_bytes()).hexdigest()
    ck = f"checkpoint={run_dir}"
    _refused(_cli(run_dir, shapes_cache, "merge", ck, f"output={final}"), "model_final.safetensors", "input itself")
    _refused(_cli(run_dir, shapes_cache, "merge", ck, f"output={run_dir / 'results.json'}"), "'.json'")
    _refused(_cli(run_dir, shapes_cache, "merge", ck, f"output={run_dir / 'model_0000001.pth'}"),
             "the run's own 'model_0000001.pth'")
    _refused(_cli(run_dir, shapes_cache, "merge", ck, f"output={run_dir.parent / 'merged.bin'}"),
             "the format follows the suffix")
    _refused(_cli(run_dir, shapes_cache, "merge", ck, "output=/dev/null/m.safetensors"), "could not write")
    assert hashlib.sha256(final.read_bytes()).hexdigest() == digest


def test_eval_output_is_never_the_runs_eval_or_checkpoint(run_dir, shapes_cache):
    before = _digest(run_dir / "eval")
    _refused(_cli(run_dir, shapes_cache, "eval", f"checkpoint={run_dir}", f"output={run_dir / 'eval'}"),
             "the run's own 'eval'")
    _refused(_cli(run_dir, shapes_cache, "eval", f"checkpoint={run_dir}",
                  f"output={run_dir / 'model_final.safetensors'}"), "is a file")
    assert _digest(run_dir / "eval") == before


def test_report_refuses_a_linked_or_special_report_file(tmp_path):
    _record(tmp_path, "full", method="full", ap=40.0, ratio=1.0)
    victim = tmp_path.parent / f"{tmp_path.name}_victim.csv"
    victim.write_text("precious\n")
    os.symlink(victim, tmp_path / "report.csv")
    from peftseg.report import build_report

    with pytest.raises(UserError, match="symbolic link"):
        build_report(tmp_path, None, Console(file=io.StringIO()))
    assert victim.read_text() == "precious\n"


def test_output_file_names_the_fix(tmp_path):
    with pytest.raises(UserError, match=r"name it e.g. m.safetensors"):
        output_file(tmp_path / "m.onnx", (".safetensors", ".pth"))
    with pytest.raises(UserError, match="is a folder"):
        output_file(tmp_path / "d.pth", (".pth",)) if (tmp_path / "d.pth").mkdir() is None else None
