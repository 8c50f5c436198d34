"""Records that never lie and resumes that reproduce.

One uninterrupted vitdet_tiny LoRA run (4 steps, a checkpoint every 2) is the reference;
a run killed with -9 after a periodic checkpoint and resumed, and a run stopped by SIGTERM
and resumed, must end with bit-identical weights (CPU, num_workers=0)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from peftseg.checkpoint.files import read_checkpoint
from peftseg.engine.distributed import launch_run
from peftseg.engine.interrupt import RunInterrupted, StopAtStepBoundary
from peftseg.errors import UserError
from helpers import cli_env

SETUP = ["train=smoke", "train.max_iter=4", "train.warmup_iters=0", "model.score_thresh_test=0.0", "train.checkpoint_period=2", "train.log_period=1",
         "train.progress=false", "train.device=cpu", "dataset.num_train=8", "dataset.num_val=2"]


def compose_cfg(*overrides):
    from peftseg.config import compose_config

    return compose_config([*SETUP, *overrides])


def train_in_process(run_dir: Path, *overrides):
    return launch_run(compose_cfg(*overrides), run_dir, run_dir.name)


def final_weights(run_dir: Path) -> dict:
    return read_checkpoint(run_dir / "model_final.safetensors")[1]["model"]


def assert_same_weights(a: Path, b: Path):
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and wa
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def metric_iterations(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.json").read_text().splitlines()
    return [json.loads(line)["iteration"] for line in lines if "total_loss" in line]


@pytest.fixture(scope="module")
def work(tmp_path_factory, shapes_cache):
    old = os.environ.get("PEFTSEG_CACHE")
    os.environ["PEFTSEG_CACHE"] = str(shapes_cache)
    yield tmp_path_factory.mktemp("resume")
    if old is None:
        os.environ.pop("PEFTSEG_CACHE", None)
    else:
        os.environ["PEFTSEG_CACHE"] = old


@pytest.fixture(scope="module")
def reference(work):
    run_dir = work / "reference"
    record = train_in_process(run_dir)
    assert record.status == "ok"
    return run_dir


def test_kill_9_after_a_periodic_checkpoint_then_resume_is_the_same_run(work, reference, shapes_cache):
    killed = work / "killed"
    env = cli_env(shapes_cache)
    proc = subprocess.Popen([sys.executable, "-m", "peftseg.cli", "train", *SETUP, f"hydra.run.dir={killed}"],
                            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (killed / "model_0000001.pth").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "model_final.safetensors").exists(), "the run ended before it could be killed"
    assert json.loads((killed / "results.json").read_text())["status"] == "running"  # not a stale "ok"
    assert (killed / ".peftseg.lock").exists()  # a dead pid's lock: taken over below
    record = train_in_process(killed, f"train.resume={killed}", f"hydra.run.dir={killed}")
    assert record.status == "ok"
    assert_same_weights(reference, killed)
    its = metric_iterations(killed)
    assert its == sorted(set(its)) and its[-1] == 3  # metrics.json: no repeated iteration
    assert not (killed / ".peftseg.lock").exists()


def test_sigterm_stops_at_a_step_boundary_records_interrupted_and_resumes_the_same(work, reference, monkeypatch):
    original = StopAtStepBoundary.after_step

    def signal_at_step_1(self):
        if self.trainer.iter == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends; handled at this boundary
        original(self)

    monkeypatch.setattr(StopAtStepBoundary, "after_step", signal_at_step_1)
    stopped = work / "stopped"
    with pytest.raises(RunInterrupted) as info:
        train_in_process(stopped)
    assert info.value.iteration == 1 and info.value.signum == signal.SIGTERM
    record = json.loads((stopped / "results.json").read_text())
    assert record["status"] == "interrupted"
    assert record["interrupted"] == {"signal": "SIGTERM", "iteration": 1, "checkpoint": "model_0000001.pth",
                                     "resume": f"train.resume={stopped}"}
    assert (stopped / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    assert not (stopped / ".peftseg.lock").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handler is gone again
    monkeypatch.undo()
    resumed = work / "resumed"
    record = train_in_process(resumed, f"train.resume={stopped}")
    assert record.status == "ok"
    assert_same_weights(reference, resumed)
    assert metric_iterations(resumed)[0] == 2
    assert metric_iterations(stopped) == [0, 1]


def test_a_second_run_in_a_claimed_dir_is_refused_naming_the_first(work):
    from peftseg.engine.rundir import claim

    run_dir = work / "claimed"
    with claim(run_dir):
        with pytest.raises(UserError, match=rf"in use by another run \(pid {os.getpid()} on host"):
            train_in_process(run_dir)
    assert not (run_dir / "results.json").exists()  # the refused run wrote nothing


def test_an_earlier_runs_outputs_are_cleared_before_training(tmp_path):
    from peftseg.engine.rundir import clear_earlier_run

    for folder in ("peft", "eval", "tb", "visualize"):
        (tmp_path / folder).mkdir()
    for name in ("results.json", "metrics.json", "last_checkpoint", "model_final.safetensors", "model_0000009.pth",
                 "train.log", "model_merged.safetensors", "peft/adapter_model.safetensors",
                 "eval/coco_instances_results.json", "tb/events.out.tfevents.1", "visualize/a.png"):
        (tmp_path / name).write_text("old")
    assert sorted(clear_earlier_run(tmp_path)) == ["eval/", "last_checkpoint", "metrics.json", "model_0000009.pth",
                                                   "model_final.safetensors", "peft/", "results.json", "tb/",
                                                   "visualize/"]
    assert (tmp_path / "train.log").exists() and (tmp_path / "model_merged.safetensors").exists()
    (tmp_path / "model_0000009.pth").write_text("old")
    (tmp_path / "results.json").write_text("old")
    clear_earlier_run(tmp_path, resume=str(tmp_path / "model_0000009.pth"))  # resuming from inside
    assert (tmp_path / "model_0000009.pth").exists() and not (tmp_path / "results.json").exists()


def test_failures_name_their_real_cause(tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    from peftseg.engine.failure import diverged, explain

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model_final.pth"))
    assert "is full" in str(explain(full, tmp_path)) and "model_final.pth" in str(explain(full, tmp_path))
    denied = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "metrics.json"))
    assert "permission denied writing" in str(explain(denied, tmp_path))
    torch_writer = RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing "
                                "file data/3: file write failed")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 1 << 20))
    assert "is full (1 MiB free)" in str(explain(torch_writer, tmp_path))
    assert explain(ValueError("x"), tmp_path) is None
    nan = FloatingPointError("Loss became infinite or NaN at iteration=7!\nloss_dict = {'loss_cls': "
                             "np.float64(0.5), 'loss_mask': np.float64(nan), 'loss_box_reg': np.float64(inf)}")
    text = str(diverged(nan, 7))
    assert "at iteration 7 (loss_mask=nan, loss_box_reg=inf)" in text and "train.base_lr" in text
    text = str(diverged(FloatingPointError("Predicted boxes or scores contain Inf/NaN. Training has diverged."), 4))
    assert "iteration 4" in text and "train.warmup_iters" in text
