"""A run's claim on its run dir, and clearing what an earlier run left there.

Two runs in one dir would interleave their checkpoints and overwrite each other's record,
and a run that dies in a reused dir would leave the earlier run's "ok" record (and its
model_final) looking like its own. So a run takes a lock file (pid, host, start time)
before it writes anything, refuses a dir another live run holds, and clears the earlier
run's record, checkpoints, metrics, predictions, events and drawings before it trains. A lock left by a process that no
longer exists on this host (kill -9, a crash), or by the same SLURM job before SLURM requeued
it (killed on another node), is taken over with a warning.

An interrupted run (a preemption, a time limit, Ctrl-C) is not an earlier run's leftovers but a
run in progress: a new run in its dir is refused, naming `train.resume=<dir>`, and a resume from
inside the dir keeps its checkpoints, export and event files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path

from peftseg.errors import UserError
from peftseg.results import now

log = logging.getLogger(__name__)

LOCK = ".peftseg.lock"
# what a run writes that a later run in the same dir must not inherit
# (model_merged.* of `peftseg merge` is the user's, not the run's: kept)
_EARLIER_OUTPUTS = ("results.json", "metrics.json", "last_checkpoint", "model_[0-9]*.pth", "model_final.pth",
                    "model_final.safetensors")

# folders of an earlier run: its peft export (peftseg.checkpoint.formats), its COCO predictions
# (which `peftseg visualize` would draw under the new run's title), its TensorBoard events
# and its drawings
_EARLIER_FOLDERS = ("peft", "eval", "tb", "visualize")
# what a run resumed from inside its dir continues rather than replaces: its export is
# rewritten at the end, and its event files hold the curve up to the checkpoint
_CONTINUED_FOLDERS = ("peft", "tb")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _read_lock(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# a lock file is written a moment after it is created: one that names no process after this
# long was left half-written by a killed run (or written by something else)
_GARBAGE_LOCK_AGE_S = 10.0


def _age_s(path: Path) -> float:
    import time

    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _head(path: Path) -> str:
    try:
        return path.read_bytes()[:40].decode(errors="replace")
    except OSError:
        return ""


def _slurm_job() -> dict:
    """The SLURM job this process belongs to, and how often SLURM has started it ({} outside one)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return {}
    try:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        restarts = 0
    return {"slurm_job": job, "slurm_restart": restarts}


def _earlier_start_of_this_job(other: dict) -> bool:
    mine = _slurm_job()
    restart = other.get("slurm_restart")
    return bool(mine) and other.get("slurm_job") == mine["slurm_job"] and isinstance(restart, int) \
        and restart < mine["slurm_restart"]


@contextlib.contextmanager
def claim(run_dir: Path):
    """Hold `run_dir` for this process while the block runs."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK
    host = socket.gethostname()
    mine = {"pid": os.getpid(), "host": host,
            "start_time": now(), **_slurm_job()}
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except PermissionError as e:
        raise UserError(f"cannot create the run dir {run_dir} (permission denied: {e.filename}); run from a "
                        "folder you can write to, or set hydra.run.dir=<a writable folder>.") from None
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            other = _read_lock(path)
            pid = other.get("pid")
            if not isinstance(pid, int) and _age_s(path) > _GARBAGE_LOCK_AGE_S:
                # not a lock a live run holds: its writer died between creating and writing it
                # (the file is created first, then filled), or something else wrote it
                log.warning("run dir %s: taking over the lock %s, which names no process (%r)", run_dir, path,
                            _head(path))
                path.unlink(missing_ok=True)
                continue
            if not isinstance(pid, int):
                raise UserError(
                    f"run dir {run_dir} has a lock file {path} that names no process; another run may be "
                    "creating it right now. Try again in a few seconds; if it stays, delete the file."
                ) from None
            if other.get("host") == host and isinstance(pid, int) and not _alive(pid):
                log.warning("run dir %s: taking over the lock of pid %d, which is no longer running", run_dir, pid)
                path.unlink(missing_ok=True)
                continue
            if _earlier_start_of_this_job(other):
                # SLURM requeues a job only once it has ended: the holder (killed on another node
                # by a preemption or a time limit) is gone
                log.warning("run dir %s: taking over the lock of SLURM job %s before it was requeued (pid %d on "
                            "host %s)", run_dir, other.get("slurm_job"), pid, other.get("host"))
                path.unlink(missing_ok=True)
                continue
            raise UserError(
                f"run dir {run_dir} is in use by another run (pid {pid} on host {other.get('host')}, started "
                f"{other.get('start_time')}); two runs in one dir would mix their checkpoints and records. "
                "Wait for that run to end, or give this one its own dir (hydra.run.dir=<another folder>); "
                f"if that run is gone (a crashed machine), delete {path}."
            ) from None
        except PermissionError:
            raise UserError(f"run dir {run_dir} is not writable (permission denied); make it writable or set "
                            "hydra.run.dir=<a writable folder>.") from None
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        break
    try:
        yield
    finally:
        if _read_lock(path).get("pid") == mine["pid"]:
            path.unlink(missing_ok=True)


def resumes_from_inside(run_dir: Path, resume: str) -> bool:
    if not resume:
        return False
    source = Path(resume).resolve()
    here = Path(run_dir).resolve()
    return source == here or here in source.parents


def interrupted_run(run_dir: Path) -> dict | None:
    """The record (as JSON) of an interrupted run in `run_dir` that `train.resume` can continue:
    its checkpoints are a run in progress, not leftovers. None when there is none."""
    path = Path(run_dir) / "results.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("status") != "interrupted":
        return None
    info = record.get("interrupted")
    # resume: steps are left; evaluate: training is complete, its final evaluation is not
    return record if isinstance(info, dict) and (info.get("resume") or info.get("evaluate")) else None


def refuse_to_replace_interrupted(run_dir: Path, resume: str = "") -> None:
    """UserError when `run_dir` holds an interrupted run that this run would clear (it does not
    resume from inside the dir): a preempted or timed-out run's checkpoints are never deleted
    by a new run started there; the message names the resume that continues it."""
    record = interrupted_run(run_dir)
    if record is None or resumes_from_inside(run_dir, resume):
        return
    info = record["interrupted"]
    after = f" after iteration {info['iteration']}" if isinstance(info.get("iteration"), int) else ""
    saved = f", checkpoint {info['checkpoint']}" if info.get("checkpoint") else ""
    if info.get("resume"):
        what = "its checkpoints", f"Continue it with `peftseg train {info['resume']}` (its settings come from the checkpoint)"
    else:
        what = "its trained model", f"Training is complete, only its final evaluation is missing: `{info['evaluate']}`"
    raise UserError(
        f"run dir {run_dir} holds an interrupted run (stopped by {info.get('signal')}{after}{saved}); a new run "
        f"there would delete {what[0]}. {what[1]}; or give this run its own dir (hydra.run.dir=<another folder>)."
    )


def clear_earlier_run(run_dir: Path, resume: str = "") -> list[str]:
    """Delete an earlier run's record, checkpoints, metrics, eval/, tb/, visualize/ and peft/;
    checkpoints, peft/ and tb/ stay when this run resumes from one of them (its metrics.json is
    trimmed by the trainer instead)."""
    keep_checkpoints = resumes_from_inside(run_dir, resume)
    removed = []
    for pattern in _EARLIER_OUTPUTS:
        if keep_checkpoints and pattern != "results.json":
            continue
        for p in Path(run_dir).glob(pattern):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    for folder in _EARLIER_FOLDERS:
        if keep_checkpoints and folder in _CONTINUED_FOLDERS:
            continue
        path = Path(run_dir) / folder
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            removed.append(f"{folder}/")
        elif path.is_symlink() or path.is_file():  # never follow a link out of the run dir
            path.unlink()
            removed.append(folder)
    if removed:
        log.info("run dir %s: removed %d files of an earlier run (%s)", run_dir, len(removed), ", ".join(sorted(removed)[:5]))
    return removed


def trim_metrics(path: Path, start_iter: int) -> None:
    """Keep the metrics.json lines of iterations before `start_iter` (a resumed run writes
    the later ones again; detectron2's JSONWriter appends)."""
    from peftseg.io.atomic import write_atomic
    from peftseg.io.training_log import read_training_log

    path = Path(path)
    if not path.is_file():
        return
    # a line cut by a kill is dropped
    kept = [line for line, row in read_training_log(path.parent) if row["iteration"] < start_iter]

    write_atomic(path, "".join(f"{line}\n" for line in kept).encode())
