"""Preempted and timed-out jobs come back and finish.

The scheduler's warning (SIGUSR2 under submitit, SIGUSR1 in many job scripts) or SIGTERM
stops a run at a step boundary with a checkpoint; a submitit member asks to be requeued and
its requeued job resumes in the same run dir, ending `ok` with the weights of an
uninterrupted run, bit for bit (CPU, num_workers=0). A job SLURM requeues by itself continues
its own interrupted run; a run started by hand in that dir is refused, naming the resume.
"""

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

from helpers import _in, cli_env, cli_in_process

SETUP = ["method=lora", "train=smoke", "train.max_iter=6", "train.warmup_iters=0", "train.log_period=1",
         "train.progress=false", "train.device=cpu", "dataset.num_train=8", "dataset.num_val=2",
         "model.score_thresh_test=0.0"]


def final_weights(run_dir: Path) -> dict:
    from peftseg.checkpoint.files import read_checkpoint

    return read_checkpoint(Path(run_dir) / "model_final.safetensors")[1]["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and wa
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "results.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return None


def metric_iterations(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.json"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line)["iteration"] for line in lines if "total_loss" in line]


def training_starts(log: Path) -> list[int]:
    return [int(line.rsplit(" ", 1)[1]) for line in log.read_text().splitlines()
            if "Starting training from iteration" in line]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shapes_cache):
    """The same run, uninterrupted, in this process."""
    from peftseg.config import compose_config
    from peftseg.engine.distributed import launch_run

    run_dir = tmp_path_factory.mktemp("preemption") / "reference"
    with _in(os.getcwd(), shapes_cache):  # the shapes data the session shares
        assert launch_run(compose_config(SETUP), run_dir, "reference").status == "ok"
    return run_dir


def _wait_for_first_step(proc, run_dir: Path, deadline_s: float = 240) -> None:
    deadline = time.monotonic() + deadline_s
    while not metric_iterations(run_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be stopped: " + proc.communicate()[0][-3000:]


def _lock_pid(run_dir: Path) -> int:
    for _ in range(200):
        try:
            return json.loads((run_dir / ".peftseg.lock").read_text())["pid"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)  # created a moment before it is filled
    raise AssertionError("the run holds no lock")


def test_a_member_warned_by_the_scheduler_is_requeued_and_ends_as_if_never_stopped(tmp_path, shapes_cache,
                                                                                  reference):
    """submitit's local executor stands in for SLURM: the warning signal goes to the member's
    job process mid-run (as `sbatch --signal=USR2@…` sends it); the job checkpoints, submitit
    requeues it through the launcher's checkpoint(), and the requeued job resumes in place."""
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "peftseg.cli", "train", "-m", "hydra/launcher=local", *SETUP,
                             f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=cli_env(shapes_cache),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    member = sweep / "0-vitdet_tiny-lora"
    try:
        _wait_for_first_step(proc, member)
        job = _lock_pid(member)  # the job's process, which holds the run dir
        os.kill(job, signal.SIGUSR2)
        seen = []
        while proc.poll() is None:
            now = status(member)
            if now and (not seen or seen[-1] != now):
                seen.append(now)
            time.sleep(0.02)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "sweep: 0 of 1 runs failed" in out
    record = json.loads((member / "results.json").read_text())
    assert record["status"] == "ok" and record["config"]["train.resume"] == str(member)
    # one record, in the member's own dir: running, interrupted at the warning, running again, ok
    assert seen[-3:] == ["interrupted", "running", "ok"], seen
    (job_log,) = (sweep / ".submitit").glob("*/*_0_log.err")
    assert "this job is preempted" in job_log.read_text()  # submitit's handler took the requeue
    # the requeued submission itself says to resume (the launcher's checkpoint()): the job did
    # not have to find its run in the dir
    assert f"train.resume='{member}'" in (member / ".hydra" / "overrides.yaml").read_text()
    assert "this requeued job continues it" not in (member / "train.log").read_text()
    starts = training_starts(member / "train.log")  # the job's log, both times
    assert len(starts) == 2 and starts[0] == 0 and 1 <= starts[1] < 6, starts
    stopped_at = starts[1] - 1
    assert (member / f"model_{stopped_at:07d}.pth").is_file()  # the requeued job kept its checkpoint
    assert metric_iterations(member) == list(range(6))  # every step once
    assert_same_weights(reference, member)
    report = cli_in_process("report", str(sweep), cwd=tmp_path, cache=shapes_cache)
    assert report.returncode == 0, report.stdout + report.stderr
    assert "1 runs (0 not ok)" in report.stdout
    print(f"timeline: stopped after iteration {stopped_at}, resumed from iteration {starts[1]}, statuses {seen}; "
          "final weights equal to the uninterrupted run's")


def test_sigterm_in_a_slurm_job_then_slurms_own_requeue_continues_the_run(tmp_path, shapes_cache, reference):
    """A preemption that only sends SIGTERM: the run stops with a checkpoint; the job SLURM
    requeues runs the same command again, which continues the run. The same command typed by
    hand is refused, naming the resume, and deletes nothing."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "peftseg.cli", "train", *SETUP, f"hydra.run.dir={run_dir}"]
    in_slurm = cli_env(shapes_cache, SLURM_JOB_ID="4242")
    proc = subprocess.Popen(command, cwd=tmp_path, env=in_slurm, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_first_step(proc, run_dir)
    os.killpg(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "interrupted" and record["interrupted"]["resume"] == f"train.resume={run_dir}"
    files = sorted(p.name for p in run_dir.iterdir())

    by_hand = subprocess.run(command, cwd=tmp_path, env=cli_env(shapes_cache), capture_output=True, text=True,
                             timeout=300)
    assert by_hand.returncode == 2, by_hand.stdout[-3000:] + by_hand.stderr[-3000:]
    said = " ".join(by_hand.stderr.split())
    assert f"holds an interrupted run (stopped by SIGTERM after iteration {record['interrupted']['iteration']}" in said
    assert f"peftseg train train.resume={run_dir}" in said
    assert sorted(p.name for p in run_dir.iterdir()) == files and status(run_dir) == "interrupted"

    requeued = subprocess.run(command, cwd=tmp_path, env={**in_slurm, "SLURM_RESTART_COUNT": "1"},
                              capture_output=True, text=True, timeout=300)
    assert requeued.returncode == 0, requeued.stdout[-3000:] + requeued.stderr[-3000:]
    assert "this requeued job continues it" in requeued.stdout + requeued.stderr
    assert status(run_dir) == "ok"
    starts = training_starts(run_dir / "train.log")
    assert starts == [0, record["interrupted"]["iteration"] + 1], starts
    assert metric_iterations(run_dir) == list(range(6))
    assert_same_weights(reference, run_dir)


def test_sigusr1_stops_at_a_step_boundary_as_sigterm_does(tmp_path, shapes_cache, monkeypatch):
    from peftseg.config import compose_config
    from peftseg.engine.distributed import launch_run
    from peftseg.engine.interrupt import RunInterrupted, StopAtStepBoundary

    original = StopAtStepBoundary.after_step

    def warning_at_step_1(self):
        if self.trainer.iter == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # a job script's `#SBATCH --signal=USR1@120`
        original(self)

    monkeypatch.setattr(StopAtStepBoundary, "after_step", warning_at_step_1)
    monkeypatch.setenv("PEFTSEG_CACHE", str(shapes_cache))
    with pytest.raises(RunInterrupted) as info:
        launch_run(compose_config([*SETUP, "train.max_iter=3"]), tmp_path, "warned")
    assert info.value.signum == signal.SIGUSR1 and info.value.iteration == 1
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["interrupted"] == {"signal": "SIGUSR1", "iteration": 1, "checkpoint": "model_0000001.pth",
                                     "resume": f"train.resume={tmp_path}"}
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the run's handler is gone again


def test_loader_workers_leave_the_schedulers_warning_to_the_main_process():
    from peftseg.data.loading.loaders import _leave_stops_to_the_main_process

    class Probe(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return [signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGUSR1, signal.SIGUSR2)]

    loader = _leave_stops_to_the_main_process(torch.utils.data.DataLoader(Probe(), num_workers=1, batch_size=None))
    assert [list(x) for x in loader] == [[True, True]]


def _record(run_dir: Path, **interrupted) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps({"status": "interrupted", "interrupted": interrupted}))


def test_a_requeued_member_carries_train_resume_only_when_steps_are_left(tmp_path):
    from peftseg.engine.requeue import resume_overrides

    given = ["method=lora", "train.max_iter=6"]
    assert resume_overrides(given, tmp_path / "fresh") == given  # stopped before a checkpoint: starts over
    _record(tmp_path / "a b'c", signal="SIGUSR2", iteration=3, checkpoint="model_0000003.pth",
            resume=f"train.resume={tmp_path / 'a b'}")
    resumed = resume_overrides([*given, "train.resume=/elsewhere"], tmp_path / "a b'c")
    assert resumed == [*given, f"train.resume='{tmp_path}/a b\\'c'"]  # quoted for Hydra, given once
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert OverridesParser.create().parse_overrides([resumed[-1]])[0].value() == str(tmp_path / "a b'c")
    # in its final evaluation: training is complete, a requeue would retrain nothing
    _record(tmp_path / "trained", signal="SIGUSR2", iteration=5, checkpoint="model_final.safetensors", resume=None,
            evaluate="peftseg eval checkpoint=x")
    assert resume_overrides(given, tmp_path / "trained") == given


def test_a_new_run_never_clears_a_run_interrupted_in_its_final_evaluation(tmp_path):
    from peftseg.engine.rundir import refuse_to_replace_interrupted
    from peftseg.errors import UserError

    _record(tmp_path, signal="SIGUSR2", iteration=5, checkpoint="model_final.safetensors", resume=None,
            evaluate=f"peftseg eval checkpoint={tmp_path}")
    with pytest.raises(UserError, match="Training is complete, only its final evaluation is missing: "
                                        f"`peftseg eval checkpoint={tmp_path}`"):
        refuse_to_replace_interrupted(tmp_path, "")


def test_only_a_requeued_job_continues_its_run_by_itself_and_only_with_the_same_config(tmp_path, monkeypatch):
    from peftseg.config import compose_config
    from peftseg.engine.requeue import continues_own_run
    from peftseg.results import flatten_config

    cfg = compose_config(SETUP)
    _record(tmp_path, signal="SIGTERM", iteration=2, checkpoint="model_0000002.pth",
            resume=f"train.resume={tmp_path}")
    record = json.loads((tmp_path / "results.json").read_text())
    record["config"] = json.loads(json.dumps(flatten_config(cfg)))
    (tmp_path / "results.json").write_text(json.dumps(record))
    for name in ("SLURM_RESTART_COUNT", "SUBMITIT_FOLDER"):
        monkeypatch.delenv(name, raising=False)
    assert continues_own_run(cfg, tmp_path) is None  # started by hand: refused by launch_run instead
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert continues_own_run(cfg, tmp_path) == "interrupted by SIGTERM after iteration 2"
    assert continues_own_run(compose_config([*SETUP, "train.base_lr=0.01"]), tmp_path) is None  # another run
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    monkeypatch.setenv("SUBMITIT_FOLDER", str(tmp_path / ".submitit"))  # a member of a submitit sweep
    assert continues_own_run(cfg, tmp_path) is not None

    # SIGKILL before the step ended (a preemption's grace time too short): still "running",
    # with a periodic checkpoint to continue from
    record["status"], record["interrupted"] = "running", None
    (tmp_path / "results.json").write_text(json.dumps(record))
    assert continues_own_run(cfg, tmp_path) is None  # no checkpoint: it starts over
    (tmp_path / "model_0000001.pth").write_bytes(b"x")
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    assert continues_own_run(cfg, tmp_path) == "killed before it could stop; its last checkpoint is model_0000001.pth"


def test_a_job_requeued_after_a_kill_takes_over_the_lock_its_earlier_start_left(tmp_path, monkeypatch):
    from peftseg.engine.rundir import LOCK, claim
    from peftseg.errors import UserError

    # held by this SLURM job before it was requeued, on another node
    lock = {"pid": 1, "host": "node-17", "start_time": "x", "slurm_job": "4242", "slurm_restart": 0}
    (tmp_path / LOCK).write_text(json.dumps(lock))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the same start of the job: a live holder
    with pytest.raises(UserError, match="in use by another run"):
        with claim(tmp_path):
            pass
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(UserError, match="in use by another run"):
        with claim(tmp_path):
            pass
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with claim(tmp_path):
        held = json.loads((tmp_path / LOCK).read_text())
        assert held["pid"] == os.getpid() and held["slurm_restart"] == 1


def test_a_warning_after_a_submitit_members_run_has_ended_does_not_requeue_it(monkeypatch):
    from peftseg.engine.requeue import ignore_late_warnings

    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    try:
        monkeypatch.delenv("SUBMITIT_FOLDER", raising=False)
        ignore_late_warnings()  # not a submitit job: nothing to requeue, handlers as they were
        assert {s: signal.getsignal(s) for s in saved} == saved
        monkeypatch.setenv("SUBMITIT_FOLDER", "/x")
        ignore_late_warnings()  # submitit's handler would requeue the ended member: started over
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in saved)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
