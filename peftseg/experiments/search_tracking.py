"""MLflow for a search (`+tracking=mlflow`): the study is a parent run, each trial a child.
Hydra's callbacks do not run under `peftseg search`, so the tracker is opened here."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from peftseg.experiments.study_storage import workers_lock

log = logging.getLogger(__name__)

MLFLOW_PARENT_ATTR = "peftseg.mlflow_parent"


def open_tracker(cfg, say=log.warning):
    """The MLflow tracker `+tracking=mlflow` asks for (Hydra callbacks do not run here), its
    start checks done: a store it cannot write, or one another process holds past the wait
    (said at once through `say`), is refused before the first trial."""
    if cfg.get("tracking") is None:
        return None
    from peftseg.experiments.tracking import MlflowTracker

    tracker = MlflowTracker(uri=cfg.tracking.uri, experiment=cfg.tracking.experiment)
    tracker.start(say)
    return tracker


def track_trial(tracker, study, plan, number: int, run_dir: Path, say=log.warning) -> None:
    from peftseg.experiments.tracking import STORE_WAIT_S
    from peftseg.results import read_record

    held = tracker.wait_for_store(say)  # a store held since the start: said at once, not 20 s per statement
    if held:
        log.warning("MLflow: trial %d not tracked: its store is still locked by another process after %g s (%s)",
                    number, STORE_WAIT_S, held)
        return
    with workers_lock(plan.options.storage):  # one parent run per study, whichever worker is first
        parent = study.user_attrs.get(MLFLOW_PARENT_ATTR)
        if parent is None:
            try:
                parent = tracker.start_parent(
                    f"search {plan.options.study}", {"peftseg.kind": "search", "peftseg.study": plan.options.study},
                    {"search.storage": plan.options.storage, "search.fixed": " ".join(plan.fixed)})
            except Exception as exc:  # tracking never takes the search down; the next trial tries again
                log.warning("MLflow: trial %d not tracked, the study's parent run could not be made: %s: %s",
                            number, type(exc).__name__, exc)
                return
            study.set_user_attr(MLFLOW_PARENT_ATTR, parent)
    try:
        record = read_record(run_dir).to_dict()
    except (OSError, ValueError):
        record = {}
    config = record.get("config") or {}
    tracker.log_run(run_dir, record, str(config.get("model.name")), str(config.get("method.name")), parent,
                    tags={"peftseg.study": plan.options.study, "peftseg.trial": str(number)})


def finish_tracking(tracker, study, summary: dict) -> None:
    parent = study.user_attrs.get(MLFLOW_PARENT_ATTR)
    if parent is None:
        return
    try:
        client = tracker.client()
        if client.get_run(parent).info.status == "RUNNING":
            for key in ("n_trials", "best_trials"):
                client.set_tag(parent, f"peftseg.{key}", json.dumps(summary[key]))
            client.set_terminated(parent, "FINISHED")
    except Exception as exc:  # tracking never takes the search down
        log.warning("MLflow: the study's parent run %s was not closed: %s", parent, exc)
