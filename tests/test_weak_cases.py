"""Weak cases: each one is one clear paragraph naming the fix, exit 2, no traceback."""

import csv
import io
import json
import os
from pathlib import Path

import pytest
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import cli_in_process
from peftseg.config import compose_config, validate
from peftseg.errors import UserError
from peftseg.report import build_report
from peftseg.results import read_record
from test_finite import _record


@pytest.mark.parametrize("override, needles", [
    ("model.patch_size=0", ["model.patch_size must be an integer at least 1 (got 0)"]),
    ("model.num_heads=0", ["model.num_heads must be an integer at least 1 (got 0)"]),
    ("model.depth=0", ["model.depth must be an integer at least 1 (got 0)"]),
    ("model.embed_dim=0", ["model.embed_dim must be an integer at least 1 (got 0)"]),
    ("model.drop_path_rate=5", ["model.drop_path_rate must be a number >= 0 and < 1 (got 5.0)"]),
    ("model.window_block_indexes=[99]", ["names block(s) [99]", "does not have"]),
    (f"train.seed={2**32}", ["train.seed must be an integer from 0 to 4294967295", "32-bit"]),
    ("train.lr_steps=[0.5,0.5]", ["strictly increasing", "each step once"]),
    # still warming up when training ends: the record's base_lr would never have been trained at
    ("train.warmup_iters=5000", ["train.warmup_iters=5000 is not shorter than train.max_iter=1000",
                                 "peak at 0.201 x train.base_lr", "(e.g. train.warmup_iters=100)"]),
])
def test_config_values_that_cannot_train_are_named(override, needles):
    with pytest.raises(UserError) as err:
        validate(compose_config(["model=vitdet_tiny", override]))
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


@pytest.mark.parametrize("version", [-7, 0, True, "2"])
def test_a_record_with_a_nonsense_schema_version_is_refused(tmp_path, version):
    _record(tmp_path, "r")
    data = json.loads((tmp_path / "r" / "results.json").read_text())
    data["schema_version"] = version
    (tmp_path / "r" / "results.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="is not a record version"):
        read_record(tmp_path / "r")


def test_report_csv_flattens_the_run_and_names_a_mistyped_baseline(tmp_path):
    _record(tmp_path, "full", method="full", ap=40.0, ratio=1.0)
    build_report(tmp_path, None, Console(file=io.StringIO()))
    with open(tmp_path / "report.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert "run" not in row and row["run.id"] == "full" and row["run.dir"] == str(tmp_path / "full")
    assert not any("RunInfo(" in str(v) for v in row.values())
    proc = cli_in_process("report", str(tmp_path), "--baseline", "fulll", cwd=tmp_path, cache=tmp_path)
    assert proc.returncode == 2 and "did you mean --baseline full?" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def merged(finished_lora_run, shapes_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "merged.safetensors"
    proc = cli_in_process("merge", f"checkpoint={finished_lora_run}", f"output={out}", cwd=out.parent,
                          cache=shapes_cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def _edited(merged, tmp_path, edit):
    with safe_open(str(merged), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    inner = json.loads(meta["peftseg_merged"])
    edit(inner)
    meta["peftseg_merged"] = json.dumps(inner)
    path = tmp_path / "edited.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["class_names"].append("extra"), "does not fit the model its metadata names"),
    (lambda m: m.pop("config"), "its metadata has no config"),
    (lambda m: m.__setitem__("class_names", "circle"), "no list of class names"),
])
def test_an_edited_merged_file_is_named(merged, shapes_cache, tmp_path, edit, needle):
    path = _edited(merged, tmp_path, edit)
    image = sorted(shapes_cache.rglob("val/*.png"))[0]  # predict: no dataset whose classes would be compared
    proc = cli_in_process("predict", f"checkpoint={path}", f"input={image}", f"output={tmp_path / 'p'}",
                          cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_classes_for_a_checkpoint_that_records_its_own_is_refused(finished_lora_run, shapes_cache, tmp_path):
    image = sorted(shapes_cache.rglob("val/*.png"))[0]
    proc = cli_in_process("predict", f"checkpoint={finished_lora_run}", f"input={image}", "classes=[cat,dog,cow]",
                          f"output={tmp_path / 'p'}", cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Leave classes= out" in proc.stderr and "PEFT checkpoint" in proc.stderr


@pytest.mark.parametrize("argv, needles", [
    (["method.rnk=4"], ["method.rnk is not a setting of method 'lora' (did you mean method.rank?)"]),
    (["train.max_iter=abc"], ["train.max_iter=abc cannot be applied: Value 'abc' of type 'str' could not be "
                              "converted to Integer", "a value of its type"]),
    (["-m", "method=full,adapter", "method.adapters_per_block=1"],
     ["in the sweep member `method=full method.adapters_per_block=1`",
      "method.adapters_per_block is not a setting of method 'full'"]),
])
def test_hydra_refusals_are_one_paragraph_naming_what_was_asked(argv, needles):
    from peftseg.config import check_overrides

    with pytest.raises(UserError) as err:
        check_overrides(argv)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    assert "LoraConfig" not in str(err.value)
    check_overrides(["-m", "method=adapter", "method.adapters_per_block=1,2", "hydra.run.dir=x"])  # fine: no error


def test_train_exits_2_on_a_value_of_the_wrong_type(peftseg, tmp_path):
    proc = peftseg("train", "train.max_iter=abc")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "train.max_iter=abc cannot be applied" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("command", ["predict", "visualize", "eval", "merge"])
def test_help_exits_0(command, tmp_path):
    proc = cli_in_process(command, "--help", cwd=tmp_path, cache=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"peftseg {command}" in proc.stdout


def test_logs_written_to_a_file_are_not_wrapped_at_80_columns(capsys):
    import logging.config

    from omegaconf import OmegaConf

    from peftseg.config import CONF_DIR

    handler = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "hydra" / "job_logging" / "rich.yaml").handlers.console)
    logging.config.dictConfig({"version": 1, "handlers": {"console": handler}, "disable_existing_loggers": False,
                               "loggers": {"peftseg.test_wrap": {"handlers": ["console"], "level": "INFO"}}})
    row = "| circle     | 41.337 | square     | 38.102 | triangle   | 29.874 |" + " record: /" + "x" * 120
    logging.getLogger("peftseg.test_wrap").info(row)
    out = capsys.readouterr().out
    assert row in out.splitlines()[-1]  # one line, whole: not cut at 80 columns


def test_search_options_of_another_shape_are_read_as_meant_or_named(tmp_path):
    from peftseg.cli import search as search_cli

    assert search_cli.parse_args(["search.methods=lora"]).methods == ["lora"]  # not ['l', 'o', 'r', 'a']
    assert search_cli.parse_args(["search.methods=lora,adapter"]).methods == ["lora", "adapter"]
    with pytest.raises(UserError, match="search.pruner takes one value"):
        search_cli.parse_args(["search.pruner=median,none"])
    (tmp_path / "afile").write_text("")
    for storage in (f"sqlite:///{tmp_path}/afile/study.db", f"{tmp_path}/afile/deeper/study.log"):
        with pytest.raises(UserError, match=r"the study's file cannot be written: .*afile is a file"):
            search_cli.parse_args([f"search.storage={storage}"])
    proc = cli_in_process("search", f"search.storage=sqlite:///{tmp_path}/afile/study.db", cwd=tmp_path, cache=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "search.storage=sqlite" in proc.stderr


def test_a_search_whose_every_trial_fails_says_so_and_how_to_run_again(tmp_path, shapes_cache):
    proc = cli_in_process("search", "search.n_trials=2", "method=heads", f"search.storage=sqlite:///{tmp_path}/s.db",
                          "dataset=coco", f"dataset.root={tmp_path}/no_coco", "train=smoke", cwd=tmp_path,
                          cache=shapes_cache)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "0 complete, 0 pruned, 2 failed" in proc.stdout and "best:" not in proc.stdout
    # each failed trial says so on one line: the error, its run dir, where the whole error is
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("trial 0 failed: ")]
    assert line.startswith("trial 0 failed: UserError: No COCO dataset")
    assert line.endswith("/0-vitdet_tiny-heads; its results.json has the whole error)")
    error = proc.stderr[proc.stderr.index("error:"):]
    assert "no trial of study 'peft_search' has a result: all 2 failed (trial 0: UserError: No COCO dataset" in error
    assert "new search.study=<name> or a larger search.n_trials" in error


def test_export_writes_only_where_the_guard_allows(finished_lora_run, tmp_path):
    import os

    from peftseg.checkpoint import export as ex

    run = finished_lora_run
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)  # a special file, like /dev/null, which an atomic write as root replaced
    for output, fmt, needle in ((fifo, "onnx", "is a device, pipe or socket"),
                                (tmp_path / "m.pt", "onnx", "ends in '.pt'; the format follows the suffix"),
                                (tmp_path / "m.onnx", "torchscript", "ends in '.onnx'"),
                                (run / "model_final.safetensors", "onnx", "ends in '.safetensors'"),
                                (run / "peft" / "m.onnx", "onnx", "the run's own 'peft'")):
        with pytest.raises(UserError, match=needle):
            ex.export_checkpoint(str(run), fmt, str(output), [])
    assert fifo.is_fifo() and not (tmp_path / "m.pt").exists() and not (run / "peft" / "m.onnx").exists()


def test_the_same_run_twice_in_a_checkpoint_list_is_refused(finished_lora_run, tmp_path, shapes_cache):
    run = finished_lora_run
    for listed in (f"[{run},{run}]", f"[{run},{run}/model_final.safetensors]"):
        proc = cli_in_process("eval", f"checkpoint={listed}", f"output={tmp_path / 'ev'}", cwd=tmp_path,
                              cache=shapes_cache)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"lists {run / 'model_final.safetensors'} twice" in proc.stderr and "give each once" in proc.stderr
    assert not (tmp_path / "ev").exists()


def test_merge_under_a_file_or_an_unwritable_folder_is_one_line(finished_lora_run, tmp_path, shapes_cache):
    (tmp_path / "afile").write_text("")
    places = [(tmp_path / "afile" / "m.safetensors", "a part of the path is a file")]
    if Path("/sys/kernel").is_dir():  # sysfs (Linux) refuses new files to anyone, root included
        places.append((Path("/sys/m.safetensors"), "could not write /sys/m.safetensors: Permission denied; you may "
                                                   "not write there"))  # the file named, not its temporary sibling
    for output, needle in places:
        proc = cli_in_process("merge", f"checkpoint={finished_lora_run}", f"output={output}", cwd=tmp_path,
                              cache=shapes_cache)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert line.startswith("error: could not write ") and needle in line, line
