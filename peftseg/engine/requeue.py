"""Preempted and timed-out jobs come back and finish.

SLURM warns a job before its time limit (and, where the site sends it, before a preemption)
with a user signal: `sbatch --signal=USR2@120`, what submitit asks for under
hydra/launcher=slurm. The run stops at the next step boundary with a checkpoint and records
`interrupted` (peftseg.engine.interrupt); then, inside a submitit job, `hand_over` passes the
stop to submitit's own handler, which calls the launcher's `checkpoint()`
(hydra_plugins/peftseg_launcher: the same member with `train.resume=<its run dir>`), requeues
the job and exits. The requeued member resumes in its own run dir, and its record goes
interrupted -> running -> ok. Timeouts count against `hydra.launcher.max_num_timeout`,
preemptions do not (submitit's rule).

A job SLURM requeues by itself (a preemption that only sent SIGTERM, `scontrol requeue`) or a
member whose submission carries no `train.resume` finds its own interrupted run in its dir
(or, when SIGKILL came before the step ended, its run still "running" with a periodic
checkpoint): `continues_own_run` says to resume it, when the config is the same. Anywhere
else a new run in the dir of an interrupted one is refused by name
(peftseg.engine.rundir.refuse_to_replace_interrupted).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from peftseg.engine.interrupt import WARNINGS, RunInterrupted
from peftseg.engine.rundir import interrupted_run


def in_submitit_job() -> bool:
    return "SUBMITIT_FOLDER" in os.environ  # set by submitit in the job's process


def requeued_job() -> bool:
    """This process runs a job a scheduler started again: a submitit job (a requeued one loads
    the submission its `checkpoint()` left), or any SLURM job requeued (SLURM_RESTART_COUNT)."""
    try:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        restarts = 0
    return in_submitit_job() or restarts > 0


def _normalised(config: dict) -> dict:
    return json.loads(json.dumps(config, default=str))


def _killed_run(run_dir: Path) -> dict | None:
    """The record of a run killed before it could stop (still "running"; a preemption or time
    limit whose SIGKILL came first) that left a periodic checkpoint to continue from."""
    import re

    try:
        record = json.loads((Path(run_dir) / "results.json").read_text())
        last = (Path(run_dir) / "last_checkpoint").read_text().strip()
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("status") != "running":
        return None
    if not re.fullmatch(r"model_\d+\.pth", last) or not (Path(run_dir) / last).is_file():
        return None
    return {**record, "checkpoint": last}


def continues_own_run(cfg, run_dir: Path) -> str | None:
    """What this job continues in `run_dir` (then train.resume=<run dir>): in a requeued job
    only, when the dir holds this run (the same config) interrupted with steps left, or killed
    after a periodic checkpoint. None otherwise."""
    from peftseg.results import flatten_config

    if cfg.train.resume or not requeued_job():
        return None
    record = interrupted_run(run_dir)
    if record is not None and record["interrupted"].get("resume"):
        info = record["interrupted"]
        what = f"interrupted by {info.get('signal')} after iteration {info.get('iteration')}"
    else:
        record = _killed_run(run_dir)
        if record is None:
            return None
        what = f"killed before it could stop; its last checkpoint is {record['checkpoint']}"
    mine = {k: v for k, v in _normalised(flatten_config(cfg)).items() if k != "train.resume"}
    theirs = {k: v for k, v in (record.get("config") or {}).items() if k != "train.resume"}
    return what if mine == theirs else None


def resume_overrides(overrides: list[str], run_dir: Path | None) -> list[str]:
    """A member's overrides for its requeued job: with `train.resume=<run dir>` when the dir holds
    an interrupted run with steps left, else as they were (nothing was saved to continue)."""
    record = interrupted_run(run_dir) if run_dir is not None else None
    if record is None or not record["interrupted"].get("resume"):
        return list(overrides)
    quoted = str(run_dir).replace("\\", "\\\\").replace("'", "\\'")  # Hydra's override grammar
    return [o for o in overrides if not o.startswith("train.resume=")] + [f"train.resume='{quoted}'"]


def hand_over(stop: RunInterrupted, say) -> None:
    """Inside a submitit job, after a stop on the scheduler's warning signal: let submitit's
    handler checkpoint the submission and requeue the job (it exits: SystemExit). Returns when
    there is nothing to requeue: not a submitit job, another signal (SIGTERM: `scancel`, or a
    preemption SLURM requeues by itself), training already complete, or submitit declines
    (max_num_timeout reached)."""
    if not in_submitit_job() or stop.signum not in WARNINGS:
        return
    if stop.checkpoint and stop.checkpoint.startswith("model_final"):
        say("not requeued: training is complete, only its final evaluation is missing")
        return
    import submitit
    from submitit.core.utils import UncompletedJobError

    usr = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG, None)
    handler = signal.getsignal(usr) if usr is not None else None
    if not callable(handler):
        say(f"not requeued: no submitit handler for SIG{submitit.JobEnvironment.USR_SIG} in this job")
        return
    say("asking submitit to requeue this job; it resumes from the checkpoint in the same run dir")
    try:
        handler(usr, None)  # submitit's checkpoint_and_try_requeue: checkpoint(), requeue, exit
    except UncompletedJobError as e:
        say(f"not requeued: {e}")


def ignore_late_warnings() -> None:
    """Inside a submitit job whose run has ended (ok or failed): a warning signal from now on
    must not requeue it (the requeued job would start the ended member over); ignored."""
    import threading

    if in_submitit_job() and threading.current_thread() is threading.main_thread():
        for s in WARNINGS:
            signal.signal(s, signal.SIG_IGN)
