"""Invariant 2: outputs never destroy inputs — one guard (peftseg.io.output_guard), tested
through every command that writes: predict, visualize, merge, eval output=, report."""

import hashlib
import io
import logging
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
    from peftseg.data import register_splits

    # the run's own validation images (the session's cache may hold other shapes datasets too)
    monkeypatch.setenv("PEFTSEG_CACHE", str(shapes_cache))
    splits = register_splits(run_config(run_dir)[0]["dataset"])
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


def test_a_rerun_replaces_only_its_own_output_never_that_of_other_inputs(run_dir, shapes_cache, photos, tmp_path,
                                                                        caplog):
    """merge, eval and predict write over an existing output only when it is their own earlier
    output for the same checkpoint (and images); another checkpoint's output, or a file they did not
    write, is refused by name and left as it was."""
    from helpers import make_run

    other = make_run(tmp_path / "other_run", "method=lora", noise_seed=3)
    ck, ck2 = f"checkpoint={run_dir}", f"checkpoint={other}"

    merged = tmp_path / "merged.safetensors"
    assert _cli(run_dir, shapes_cache, "merge", ck, f"output={merged}")[0] == 0
    with caplog.at_level(logging.WARNING):  # the same command again: replaced, and said
        assert _cli(run_dir, shapes_cache, "merge", ck, f"output={merged}")[0] == 0
    assert "replacing this command's own earlier merge" in caplog.text
    first = merged.read_bytes()  # (safetensors orders header keys anew each write: compare from here)
    _refused(_cli(run_dir, shapes_cache, "merge", ck2, f"output={merged}"),
             "already exists as this command's output for other inputs", "merged_from")
    assert merged.read_bytes() == first
    mine = tmp_path / "pretrained.safetensors"  # a user's file of the same format
    mine.write_bytes(b"not a merge output")
    _refused(_cli(run_dir, shapes_cache, "merge", ck, f"output={mine}"), "it is not a `peftseg merge` output")
    assert mine.read_bytes() == b"not a merge output"

    evaluated = tmp_path / "eval_here"
    assert _cli(run_dir, shapes_cache, "eval", ck, f"output={evaluated}")[0] == 0
    record = (evaluated / "eval.json").read_text()
    assert _cli(run_dir, shapes_cache, "eval", ck, f"output={evaluated}")[0] == 0
    _refused(_cli(run_dir, shapes_cache, "eval", ck2, f"output={evaluated}"),
             "already exists as this command's output for other inputs", "checkpoint_path")
    assert (evaluated / "eval.json").read_text() == record

    out = tmp_path / "predicted"
    assert _cli(run_dir, shapes_cache, "predict", ck, f"input={photos}", f"output={out}")[0] == 0
    written = _digest(out)
    assert {"predictions.json", "predict.json"} <= written.keys()
    assert _cli(run_dir, shapes_cache, "predict", ck, f"input={photos}", f"output={out}")[0] == 0
    _refused(_cli(run_dir, shapes_cache, "predict", ck2, f"input={photos}", f"output={out}"),
             "already exists as this command's output for other inputs", "checkpoint_path")
    _refused(_cli(run_dir, shapes_cache, "predict", ck, f"input={photos / 'b.png'}", f"output={out}"),
             "already exists as this command's output for other inputs", "images_sha256")
    assert _digest(out) == written
