"""A resumed run is the interrupted run: its config comes from the
checkpoint, a setting given anew is applied (harmless ones) or refused naming it, a finished
run or a checkpoint at the end of its schedule is refused, other classes are refused.

Checkpoints here are written by PeftCheckpointer around a tiny model (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from peftseg.checkpoint.files import PeftCheckpointer, read_checkpoint
from peftseg.checkpoint.resume import check_resumable, resumed_config
from peftseg.config import compose_config
from peftseg.errors import UserError

FIRST = ["train=smoke", "train.max_iter=6", "train.warmup_iters=0", "train.base_lr=1e-3", "dataset.num_train=8", "dataset.num_val=2",
         "method.rank=2"]
CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run dir as an interrupted run leaves it: a periodic checkpoint after iteration 2."""
    from peftseg.build import build_for_run

    cfg = compose_config(FIRST)
    model = build_for_run(cfg, len(CLASSES))
    out = tmp_path_factory.mktemp("interrupted")
    meta = {"config": OmegaConf.to_container(cfg, resolve=True), "class_names": CLASSES}
    ckpt = PeftCheckpointer(model, save_dir=str(out), meta=meta)
    ckpt.save("model_0000002", iteration=2)
    ckpt.save("model_0000005", iteration=5)  # after the last step of max_iter=6
    (out / "last_checkpoint").write_text("model_0000002.pth")
    return out


def resume(run_dir, *given: str):
    overrides = [f"train.resume={run_dir}", *given]
    return resumed_config(compose_config(overrides), overrides)


def test_resume_takes_the_runs_own_config_without_repeating_overrides(run_dir):
    cfg = resume(run_dir)
    assert cfg.train.name == "smoke" and cfg.train.max_iter == 6 and cfg.train.base_lr == 1e-3
    assert cfg.method.rank == 2 and cfg.dataset.num_train == 8
    assert cfg.train.resume == str(run_dir)
    assert compose_config([f"train.resume={run_dir}"]).train.max_iter == 1000  # what it used to run


def test_repeating_the_first_runs_overrides_is_accepted(run_dir):
    cfg = resume(run_dir, *FIRST)
    assert cfg.train.max_iter == 6 and cfg.method.rank == 2


def test_a_harmless_setting_given_anew_is_applied(run_dir):
    cfg = resume(run_dir, "train.num_workers=3", "train.log_period=1", "train.device=cpu")
    assert (cfg.train.num_workers, cfg.train.log_period, cfg.train.device) == (3, 1, "cpu")
    assert cfg.train.max_iter == 6  # the rest still the checkpoint's


@pytest.mark.parametrize("given, named", [
    ("train.base_lr=0.1", "train.base_lr=0.1 (the checkpoint's run: 0.001)"),
    ("train.max_iter=50", "train.max_iter=50 (the checkpoint's run: 6)"),
    ("method.rank=8", "method.rank=8 (the checkpoint's run: 2)"),
    ("dataset.num_train=9", "dataset.num_train=9 (the checkpoint's run: 8)"),
])
def test_a_setting_that_changes_the_run_is_refused_naming_it(run_dir, given, named):
    with pytest.raises(UserError, match="continues a run as it was configured") as info:
        resume(run_dir, given)
    assert named in str(info.value) and "start a new run without train.resume" in str(info.value)


def test_another_group_choice_is_refused(run_dir):
    with pytest.raises(UserError, match=r"continues a run of train=smoke, but train=default was given"):
        resume(run_dir, "train=default")
    with pytest.raises(UserError, match=r"continues a run of method=lora, but method=bitfit was given"):
        resume(run_dir, "method=bitfit")


def test_a_checkpoint_at_the_end_of_its_schedule_is_refused(run_dir):
    with pytest.raises(UserError, match=r"saved after iteration 5, the last of its train.max_iter=6, so "
                                        r"nothing is left to train.*peftseg eval checkpoint="):
        resume(run_dir / "model_0000005.pth")


def test_a_finished_run_is_refused(tmp_path):
    from peftseg.checkpoint.files import FINAL
    from peftseg.build import build_for_run

    cfg = compose_config(FIRST)
    meta = {"config": OmegaConf.to_container(cfg, resolve=True), "class_names": CLASSES}
    # what a finished run leaves: the final checkpoint (safetensors, no optimizer)
    PeftCheckpointer(build_for_run(cfg, 3), save_dir=str(tmp_path), meta=meta).save(FINAL, iteration=5)
    with pytest.raises(UserError, match=r"model_final.safetensors is the final checkpoint of a finished run"):
        resume(tmp_path)


def test_other_class_names_are_refused(run_dir):
    source, data = read_checkpoint(run_dir / "model_0000002.pth")
    config = data["peftseg"]["config"]
    check_resumable(source, data, config, CLASSES)  # the same: fine
    with pytest.raises(UserError, match=r"predicts classes \['circle', 'square', 'triangle'\] but dataset "
                                        r"'shapes' has \['cat', 'dog', 'bird'\]"):
        check_resumable(source, data, config, ["cat", "dog", "bird"])


def test_the_cli_refuses_before_it_writes_anything(peftseg, run_dir, tmp_path):
    """Through `peftseg train`: a finished run resumed in its own dir is refused (exit 2, the
    paragraph, no traceback) before its record is touched."""
    from peftseg.checkpoint.files import FINAL
    from peftseg.build import build_for_run

    finished = tmp_path / "finished"
    cfg = compose_config(FIRST)
    meta = {"config": OmegaConf.to_container(cfg, resolve=True), "class_names": CLASSES}
    PeftCheckpointer(build_for_run(cfg, 3), save_dir=str(finished), meta=meta).save(FINAL, iteration=5)
    (finished / "results.json").write_text('{"status": "ok"}')
    r = peftseg("train", f"train.resume={finished}", f"hydra.run.dir={finished}")
    assert r.returncode == 2 and "final checkpoint of a finished run" in r.stderr, r.stdout + r.stderr
    assert (finished / "results.json").read_text() == '{"status": "ok"}'


def test_the_checkpoints_group_choices_go_to_hydra_first(run_dir):
    """So Hydra names the run dir after the model and method that run, not the defaults."""
    from peftseg.cli.train import with_resumed_groups

    argv = [f"train.resume={run_dir}", "train.num_workers=1"]
    assert with_resumed_groups(argv) == ["model=vitdet_tiny", "method=lora", "dataset=shapes", "train=smoke", *argv]
    assert with_resumed_groups(["method=lora", *argv]) == ["model=vitdet_tiny", "dataset=shapes", "train=smoke",
                                                           "method=lora", *argv]
    assert with_resumed_groups(["train=smoke"]) == ["train=smoke"]  # no resume: untouched
