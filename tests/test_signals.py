"""Signals everywhere.

The must-show case: SIGTERM to the whole process group (what `timeout`, `scancel` and a SLURM
time limit send: data-loader workers get it too) of a run with train.num_workers=2 ends
`interrupted` with a checkpoint, exit 143, and `train.resume=<run dir>` alone (no override
repeated) continues it to the same weights as an uninterrupted run. Then: a signal during an
evaluation inside training stops it at once, and every other command stops with 128+signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from peftseg.engine.interrupt import RunInterrupted
from helpers import _in, cli_env, cli_in_process, run_in_process

SETUP = ["train=smoke", "train.max_iter=4", "train.warmup_iters=0", "model.score_thresh_test=0.0", "train.log_period=1",
         "train.progress=false", "train.device=cpu", "train.num_workers=2", "dataset.num_train=8",
         "dataset.num_val=2"]


def final_weights(run_dir: Path) -> dict:
    from peftseg.checkpoint.files import read_checkpoint

    return read_checkpoint(run_dir / "model_final.safetensors")[1]["model"]


def metrics_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.json"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_sigterm_to_the_process_group_with_loader_workers_is_interrupted_and_resumes_exactly(
        tmp_path, shapes_cache):
    from peftseg.config import compose_config
    from peftseg.engine.distributed import launch_run

    killed = tmp_path / "killed"
    # its own session: the signal goes to the run's group (main process + loader workers), not to pytest's
    proc = subprocess.Popen([sys.executable, "-m", "peftseg.cli", "train", *SETUP, f"hydra.run.dir={killed}"],
                            cwd=tmp_path, env=cli_env(shapes_cache), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while metrics_lines(killed) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the first step is done: the workers are up and training has started
    os.killpg(proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    output, _ = proc.communicate(timeout=120)
    assert time.monotonic() - sent < 30, "the stop took more than a few steps"
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    record = json.loads((killed / "results.json").read_text())
    assert record["status"] == "interrupted", record.get("error")
    stopped_at = record["interrupted"]["iteration"]
    assert 0 <= stopped_at < 3, "the run ended before the signal could stop it"
    checkpoint = f"model_{stopped_at:07d}.pth"
    assert record["interrupted"] == {"signal": "SIGTERM", "iteration": stopped_at, "checkpoint": checkpoint,
                                     "resume": f"train.resume={killed}"}
    assert (killed / checkpoint).is_file()
    assert "killed by signal" not in output and f"train.resume={killed}" in output

    # the resume as a user types it: no override of the first run repeated
    resumed = tmp_path / "resumed"
    proc = subprocess.run([sys.executable, "-m", "peftseg.cli", "train", f"train.resume={killed}",
                           f"hydra.run.dir={resumed}"], cwd=tmp_path, env=cli_env(shapes_cache),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((resumed / "results.json").read_text())
    assert record["status"] == "ok"
    assert record["config"]["train.max_iter"] == 4 and record["config"]["train.num_workers"] == 2
    # the run dir's composed config says what ran, not the command line's defaults
    from omegaconf import OmegaConf

    hydra_cfg = OmegaConf.load(resumed / ".hydra" / "config.yaml")
    assert hydra_cfg.train.max_iter == 4 and hydra_cfg.train.resume == str(killed)

    # the reference: the same run, uninterrupted
    reference = tmp_path / "reference"
    with _in(os.getcwd(), shapes_cache):  # the shapes data the session shares
        assert launch_run(compose_config(SETUP), reference, "reference").status == "ok"
    wa, wb = final_weights(reference), final_weights(resumed)
    assert wa.keys() == wb.keys() and wa
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ after the resume, e.g. {different[:3]}"


class _SignalInEvaluation:
    """Stands in for the evaluation: the signal arrives, then inference would take a minute."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
        raise AssertionError("the evaluation ran on after SIGTERM")


def test_sigterm_during_the_final_evaluation_stops_it_at_once(tmp_path, shapes_cache, monkeypatch):
    fake = _SignalInEvaluation()
    monkeypatch.setattr("peftseg.engine.trainer.evaluate", fake)
    start = time.monotonic()
    with pytest.raises(RunInterrupted) as info:
        run_in_process(tmp_path, shapes_cache, "train.max_iter=2", "train.warmup_iters=0", "dataset.num_train=4", "dataset.num_val=2")
    assert time.monotonic() - start < 55 and fake.calls == 1
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "interrupted" and info.value.signum == signal.SIGTERM
    # training is complete: the final checkpoint exists, only the evaluation is missing
    assert record["interrupted"] == {"signal": "SIGTERM", "iteration": 1, "checkpoint": "model_final.safetensors",
                                     "resume": None, "evaluate": f"peftseg eval checkpoint={tmp_path}"}
    assert (tmp_path / "model_final.safetensors").is_file()


def test_sigterm_during_a_periodic_evaluation_saves_that_step_and_stops(tmp_path, shapes_cache, monkeypatch):
    fake = _SignalInEvaluation()
    monkeypatch.setattr("peftseg.engine.trainer.evaluate", fake)
    with pytest.raises(RunInterrupted):
        run_in_process(tmp_path, shapes_cache, "train.max_iter=3", "train.warmup_iters=0", "train.eval_period=1", "dataset.num_train=4",
                       "dataset.num_val=2")
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["interrupted"] == {"signal": "SIGTERM", "iteration": 0, "checkpoint": "model_0000000.pth",
                                     "resume": f"train.resume={tmp_path}"}
    from peftseg.checkpoint.files import read_checkpoint

    saved = read_checkpoint(tmp_path / "model_0000000.pth")[1]
    assert saved["iteration"] == 0 and saved["resume"]["samples_seen"] > 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_every_command_stops_on_a_signal_with_128_plus_signal(tmp_path, shapes_cache, monkeypatch, signum):
    import peftseg.cli.report as report

    def slow_report(argv):
        os.kill(os.getpid(), signum)
        time.sleep(60)
        return 0

    monkeypatch.setattr(report, "main", slow_report)
    start = time.monotonic()
    result = cli_in_process("report", str(tmp_path), cwd=tmp_path, cache=shapes_cache)
    assert time.monotonic() - start < 30
    assert result.returncode == 128 + signum
    assert f"interrupted: peftseg report stopped by {signal.Signals(signum).name}" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers put back


def test_loader_workers_leave_stops_to_the_main_process():
    """A worker ignores SIGTERM/SIGINT (a group signal must not kill it under the main process)."""
    from peftseg.data.loading.loaders import _leave_stops_to_the_main_process

    class Probe(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return (signal.getsignal(signal.SIGTERM) == signal.SIG_IGN, signal.getsignal(signal.SIGINT) == signal.SIG_IGN)

    loader = _leave_stops_to_the_main_process(torch.utils.data.DataLoader(Probe(), num_workers=1, batch_size=None))
    assert [list(x) for x in loader] == [[True, True]]


def test_a_samples_augmentation_depends_on_its_stream_position_not_on_the_worker():
    """What makes resumes with workers exact: mapping position p draws the same numbers whatever
    state the process's RNGs are in (another worker, a fresh one after a resume), different
    positions draw differently, and the process's own RNG streams are left as they were."""
    import random

    import numpy as np

    from peftseg.data.loading.resume_state import PositionedMapping, ResumedTrainingSampler

    dicts = [{"id": i} for i in range(3)]
    mapping = PositionedMapping(dicts, lambda d: (d["id"], np.random.rand(), random.random()), seed=7)
    sampler = ResumedTrainingSampler(len(dicts), seed=7)
    keys = [k for _, k in zip(range(6), sampler)]
    np.random.seed(1)
    first = [mapping[k] for k in keys]
    np.random.seed(2)
    random.seed(2)
    before = (np.random.get_state()[1].copy(), random.getstate())
    again = [mapping[k] for k in keys]
    assert first == again
    assert len({draw for _, draw, _ in first}) == 6  # every position its own draw
    assert (np.random.get_state()[1] == before[0]).all() and random.getstate() == before[1]
    resumed = [k for _, k in zip(range(3), ResumedTrainingSampler(len(dicts), seed=7, skip=3))]
    assert [mapping[k] for k in resumed] == first[3:]  # a resumed stream maps the same samples the same way


def test_sigterm_in_the_last_step_points_to_eval_not_to_a_resume(tmp_path, shapes_cache, monkeypatch):
    from peftseg.engine.interrupt import StopAtStepBoundary

    original = StopAtStepBoundary.after_step

    def signal_in_last_step(self):
        if self.trainer.iter == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        original(self)

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated after the stop")

    monkeypatch.setattr(StopAtStepBoundary, "after_step", signal_in_last_step)
    monkeypatch.setattr("peftseg.engine.trainer.evaluate", no_evaluation)
    with pytest.raises(RunInterrupted):
        run_in_process(tmp_path, shapes_cache, "train.max_iter=2", "train.warmup_iters=0", "dataset.num_train=4", "dataset.num_val=2")
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["interrupted"] == {"signal": "SIGTERM", "iteration": 1, "checkpoint": "model_final.safetensors",
                                     "resume": None, "evaluate": f"peftseg eval checkpoint={tmp_path}"}
    assert not list(tmp_path.glob("model_*.pth"))


def test_sigterm_to_a_sweep_stops_the_whole_sweep(tmp_path, shapes_cache):
    # what `timeout`, `scancel` or a SLURM time limit do to `peftseg train -m` (basic launcher; loader
    # workers in the group: the test above):
    # the member in progress ends interrupted with its checkpoint, and no further member starts
    proc = subprocess.Popen([sys.executable, "-m", "peftseg.cli", "train", "-m", "method=heads,bitfit", "train=smoke",
                             "train.max_iter=1000", "train.warmup_iters=0", "train.num_workers=0",
                             f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                            cwd=tmp_path, env=cli_env(shapes_cache), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = tmp_path / "sweep" / "0-vitdet_tiny-heads"
    deadline = time.monotonic() + 240
    while metrics_lines(first) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # member 0 is training
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    record = json.loads((first / "results.json").read_text())
    assert record["status"] == "interrupted" and (first / record["interrupted"]["checkpoint"]).is_file()
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0-vitdet_tiny-heads"]
    assert "bitfit" not in output.split("interrupted:")[-1] and "sweep:" not in output
