"""What a newcomer hit: progress without a terminal, checkpoints, messages, plots."""

import io
import logging
import re
from types import SimpleNamespace

import pytest
import torch
from detectron2.utils.events import EventStorage
from rich.console import Console

from peftseg.engine.progress import RichProgress
from peftseg.build import resolve_device
from peftseg.engine.trainer import _FinalOnlyAtEnd
from peftseg.errors import UserError


def _trainer(max_iter: int):
    return SimpleNamespace(iter=0, max_iter=max_iter, start_iter=0, storage=None)


def test_progress_logs_lines_every_log_period_when_not_a_terminal(caplog):
    hook = RichProgress(console=Console(file=io.StringIO()), log_period=3)  # a file is no terminal
    hook.trainer = _trainer(7)
    caplog.set_level(logging.INFO, logger="peftseg.progress")
    with EventStorage() as storage:
        hook.trainer.storage = storage
        hook.before_train()
        for it in range(7):
            hook.trainer.iter = it
            storage.put_scalar("total_loss", 2.0 - 0.1 * it)
            storage.put_scalar("lr", 1e-3)
            hook.after_step()
        hook.after_train()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split()[1] for line in lines] == ["3/7", "6/7", "7/7"]  # every 3rd, and the last
    assert "loss 1.900" in lines[0] and "lr 1.00e-03" in lines[0] and "ETA" in lines[0]


class _Recorder:
    path_manager = None  # read by fvcore's PeriodicCheckpointer, used only with max_to_keep

    def __init__(self):
        self.saved = []

    def save(self, name, **kwargs):
        self.saved.append(name)


def test_no_periodic_checkpoint_beside_model_final():
    rec = _Recorder()
    hook = _FinalOnlyAtEnd(rec, period=5, max_iter=10, file_prefix="model")
    hook.trainer = _trainer(10)
    hook.before_train()
    for it in range(10):
        hook.trainer.iter = it
        hook.after_step()
    assert rec.saved == ["model_0000004", "model_final"]  # no model_0000009 holding the same weights


def test_cuda_asked_without_a_visible_gpu_names_the_real_cause(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UserError, match="CUDA 12.4 build, but no GPU is visible") as info:
        resolve_device("cuda")
    assert "install a CUDA build" not in str(info.value) and "CUDA_VISIBLE_DEVICES (currently '')" in str(info.value)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(UserError, match="CPU-only build; install a CUDA build"):
        resolve_device("cuda")


def test_images_much_larger_than_the_model_size_are_named():
    from peftseg.data.image_sizes import oversize_message

    dicts = [{"height": 512, "width": 480}] * 3
    message = oversize_message(dicts, 128, "training")
    assert "512 px on their long side" in message and "model.image_size=128" in message and "4.0x" in message
    assert oversize_message(dicts, 512, "training") is None


def test_help_keeps_optional_arguments_in_brackets(capsys):
    from peftseg.cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "[output=<file .safetensors or .pth>]" in out and "[score_thresh=0.5]" in out and "[n=8]" in out


def test_list_and_train_help_name_options_and_knobs_without_schema_groups(capsys):
    from peftseg.cli import main

    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "vitdet_tiny" in listing and "lora" in listing and "shapes" in listing and "schema" not in listing
    from peftseg.registry import DATASETS, METHODS

    # methods and datasets are described by their registration, one line each
    for spec in (METHODS.get("side"), DATASETS.get("coco_format")):
        assert re.search(rf"^  {spec.name} +{re.escape(spec.summary)}$", listing, re.MULTILINE), spec.name
    assert main(["train", "--help", "method=adapter"]) == 0
    text = capsys.readouterr().out
    assert "schema" not in text and re.search(r"^method: .*\badapter\*", text, re.MULTILINE)
    assert "method.adapters_per_block=2  # stacked in sequence at each site" in text
    assert "model.image_size=128  # 8x8 tokens" in text  # the preset's own comment
    assert "train.log_period=" in text


@pytest.mark.parametrize("width", [80, 100])
def test_list_wraps_each_description_whole_within_the_width(width):
    from peftseg.cli.list import description, list_text
    from peftseg.config import CONF_DIR, GROUPS, group_options

    text = list_text(width)
    assert max(len(line) for line in text.splitlines()) <= width
    for group in GROUPS:
        names = group_options(group)
        lines = text.split(f"{group}s ({group}=<name>):\n", 1)[1].split("\n\n", 1)[0].splitlines()
        paragraphs = {}  # an option's line and the lines under its description
        for line in lines:
            if line.startswith("   "):
                paragraphs[name] += " " + line.strip()
            else:
                name, paragraphs[line.split()[0]] = line.split()[0], line.split(None, 1)[1]
        assert list(paragraphs) == names
        for name, shown in paragraphs.items():
            assert shown == description(group, name)
            if group in ("model", "train") and (CONF_DIR / group / f"{name}.yaml").is_file():
                assert shown.endswith("."), shown  # a yaml comment's first sentence, whole
    assert description("model", "m2f_swin_t") == (
        "The published Mask2Former Swin-T COCO instance-segmentation shape, which is also what transformers' "
        "Mask2FormerConfig defaults to apart from the Swin depths.")
    # a short sentence keeps its asides
    assert description("model", "vitdet_b") == (
        "ViTDet ViT-B Mask R-CNN, the published shape (detectron2 model zoo configs/common/models/mask_rcnn_vitdet.py).")
    assert description("train", "default") == ("A full schedule on the built-in shapes data (CPU: minutes); scale "
                                                "max_iter for real data.")


def test_the_first_sentence_of_a_comment_is_taken_whole():
    from peftseg.cli.list import first_sentence

    assert first_sentence(["Swin-T (Swin paper / Swin-Transformer-Object-", "Detection: embed 96). For real work."]) == \
        "Swin-T (Swin paper / Swin-Transformer-Object-Detection: embed 96)."
    assert first_sentence(["Encoder over res3..res5, e.g. for R50 (about 1.7 M", "parameters. Really). Then more."]) == \
        "Encoder over res3..res5, e.g. for R50 (about 1.7 M parameters. Really)."
    long = "A model whose first sentence runs on" + " and on" * 12
    assert first_sentence([long + " (a source, a file", "name) to the end. More."]) == long + " to the end."
    assert first_sentence(["No full stop", "", "after a blank line"]) == "No full stop"


def test_train_help_marks_the_options_a_run_takes_by_default(capsys):
    from peftseg.cli import main
    from peftseg.config import GROUPS, compose_config, default_choices

    composed = compose_config([])
    assert default_choices() == {g: composed[g].name for g in GROUPS}
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for group, name in default_choices().items():
        assert f"{name}*" in text.split(f"\n{group}: ", 1)[1].split("\n", 1)[0], group
        assert f"\n{group}={name}  " in text


def test_long_commands_say_each_step_on_a_terminal_and_in_a_log():
    from peftseg.cli.common import Stages

    terminal = Console(file=io.StringIO(), force_terminal=True, width=100)
    with Stages(terminal, "export") as stage:
        stage("loading run/model_final.safetensors")
        stage("tracing the model and writing it as ONNX (opset 17)")
    screen = terminal.file.getvalue()
    # every finished step stays on screen with a tick and how long it took
    assert screen.count("✓") >= 2 and "loading run/model_final.safetensors" in screen and "0:00:00" in screen
    log = Console(file=io.StringIO(), width=100)  # a file: no spinner, one line per step
    with Stages(log, "export") as stage:
        stage("loading [run]/model_final.safetensors")  # a path with brackets stays as it is
        stage("parity check")
    assert log.file.getvalue() == "export: loading [run]/model_final.safetensors\nexport: parity check\n"


def test_progress_over_many_images_in_a_log_is_one_line_per_tenth():
    from peftseg.cli.common import ItemProgress

    log = Console(file=io.StringIO(), width=200)
    with ItemProgress(log, "predict", 25) as bar:
        for i in range(25):
            bar.start(f"{i:03d}.png")
            bar.advance()
    lines = log.file.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["3/25", "6/25", "9/25", "12/25", "15/25", "18/25", "21/25",
                                                    "24/25", "25/25"]
    assert lines[-1].startswith("predict: 25/25 images (024.png), elapsed 0:00:00, ETA 0:00:00")
