"""Which worker runs which trial, and the trials whose worker is gone.

Each running trial carries its worker's host, pid and a heartbeat in its user attributes,
so a worker on the same host sees a dead pid at once and any worker sees a stale heartbeat,
for every storage (Optuna's own heartbeat serves RDB storages only). A lost trial is marked
FAIL ("lost") and its parameters are enqueued to run again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

from peftseg.experiments.study_storage import trial_id

log = logging.getLogger(__name__)

STATUS_ATTR = "peftseg.status"  # ok | failed | pruned | lost | running
WORKER_ATTR = "peftseg.worker"  # {"host", "pid"} of the process running the trial
HEARTBEAT_ATTR = "peftseg.heartbeat"  # time.time() of the worker's last sign of life
RUN_DIR_ATTR = "peftseg.run_dir"
RETRY_ATTR = "peftseg.retry_of"  # the number of the lost trial this one runs again


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_lost(trial, grace_s: float, now: float | None = None) -> bool:
    """A RUNNING trial whose worker is gone: a dead pid on this host, or no heartbeat for grace_s."""
    worker = trial.user_attrs.get(WORKER_ATTR) or {}
    if worker.get("host") == socket.gethostname() and isinstance(worker.get("pid"), int):
        if worker["pid"] != os.getpid() and not _alive(worker["pid"]):
            return True
    beat = trial.user_attrs.get(HEARTBEAT_ATTR)
    start = trial.datetime_start.timestamp() if trial.datetime_start else None
    last = beat if isinstance(beat, (int, float)) else start
    return last is not None and (now or time.time()) - last > grace_s


def reclaim_lost(study, storage, grace_s: float) -> list[int]:
    """Mark lost trials FAIL ("lost") and enqueue their parameters again; their numbers.
    `storage`: the study's storage object (study_storage.open_storage)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    lost = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_lost(trial, grace_s):
            continue
        # through the storage (the study's own, as opened), as Optuna's fail_stale_trials fails
        # another worker's trial: a Trial object can only finish the trials its process asked for
        stored_as = trial_id(storage, study.study_name, trial.number)
        try:
            storage.set_trial_user_attr(stored_as, STATUS_ATTR, "lost")
            storage.set_trial_state_values(stored_as, TrialState.FAIL)
        except UpdateFinishedTrialError:  # its worker finished it after all
            continue
        study.enqueue_trial(trial.params, user_attrs={RETRY_ATTR: trial.number})
        _mark_run_lost(trial)
        lost.append(trial.number)
    return lost


def _mark_run_lost(trial) -> None:
    """The lost trial's record said "running" forever: say what happened to it."""
    from peftseg.results import read_record, write_record

    run_dir = trial.user_attrs.get(RUN_DIR_ATTR)
    try:
        record = read_record(Path(run_dir)) if run_dir else None
    except (OSError, ValueError):
        return
    if record is not None and record.status == "running":
        record.status = "failed"
        record.error = {"type": "WorkerLost", "message": f"the worker running trial {trial.number} stopped "
                        "(killed, or its node lost); the trial was enqueued to run again", "traceback": None}
        write_record(Path(run_dir), record)


def counts_toward_budget(trial) -> bool:
    from optuna.trial import TrialState

    if trial.state == TrialState.FAIL:
        return trial.user_attrs.get(STATUS_ATTR) != "lost"  # a lost trial runs again as a new one
    return True


class Heartbeat:
    """A thread that records, every `interval` s, that this worker still runs `trial`."""

    def __init__(self, trial, interval: float):
        self._trial, self._interval = trial, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="peftseg-search-heartbeat")

    def _beat(self):
        while not self._stop.wait(self._interval):
            try:
                self._trial.set_user_attr(HEARTBEAT_ATTR, time.time())
            except Exception as e:  # a storage hiccup must not end the run; the next beat retries
                log.warning("search heartbeat not recorded: %s", e)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False
