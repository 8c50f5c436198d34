"""One trial of a study: the overrides it samples, its run (as `peftseg train` runs one, with
its log in the run dir), and the pruner's judgement at each periodic evaluation."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from peftseg.errors import UserError
from peftseg.experiments.trial_workers import RUN_DIR_ATTR


def trial_overrides(trial, plan) -> list[str]:
    """The overrides trial samples: method, its knobs, and the user's sampled keys."""
    from peftseg.registry import METHODS
    from peftseg.search_space import sample_method_knobs

    fixed_keys = {o.split("=", 1)[0].lstrip("+~") for o in plan.fixed}
    out = []
    for knob in plan.sampled:
        value = knob.suggest(trial, knob.key)
        out.append(f"{knob.key}={knob.override(value)}")
    fixed_keys |= {k.key for k in plan.sampled}
    method = trial.suggest_categorical("method", plan.methods) if len(plan.methods) > 1 else plan.methods[0]
    out.insert(0, f"method={method}")
    out += sample_method_knobs(trial, method, METHODS.get(method).search_space, fixed_keys)
    return out


class TrialPruner:
    """The study's pruner judging one trial at each periodic evaluation of its run.

    In every process of the run: with several (train.num_gpus x train.num_machines > 1) it does
    what Optuna's TorchDistributedTrial does (optuna-integration, not a dependency here): rank 0
    owns the trial (reports the AP, asks the pruner) and broadcasts the decision, so every rank
    stops at the same evaluation; a rank that went on alone would wait in DDP's next all-reduce
    for ever. Spawned processes get it pickled: study name, storage, trial number and pruner,
    from which rank 0 opens the trial again; the process that asked for the trial uses its own.
    """

    def __init__(self, trial, metric_task: str, storage: str):
        self.metric_task, self.storage = metric_task, str(storage)
        self.study_name, self.number, self.pruner = trial.study.study_name, trial.number, trial.study.pruner
        self._trial = trial  # this process's; not pickled

    def __getstate__(self):
        return {**self.__dict__, "_trial": None}

    def _open(self):
        if self._trial is None:
            import optuna

            from peftseg.compat import reopen_trial
            from peftseg.experiments.study_storage import open_storage, trial_id

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            storage = open_storage(self.storage)
            # a random sampler: opening a trial runs the sampler's before_trial, which must not
            # touch a trial that is already running
            study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=self.pruner,
                                      sampler=optuna.samplers.RandomSampler())
            self._trial = reopen_trial(study, trial_id(storage, self.study_name, self.number))
        return self._trial

    def _judge(self, iteration: int, results: dict) -> tuple[float, bool]:
        import math

        value = (results.get(self.metric_task) or {}).get("AP")
        # NaN (the model predicted nothing) is reported as such: Optuna's pruners prune it
        value = float(value) if isinstance(value, (int, float)) else math.nan
        trial = self._open()
        trial.report(value, step=iteration)
        return value, trial.should_prune()

    def __call__(self, iteration: int, results: dict, final: bool) -> None:
        from detectron2.utils import comm

        from peftseg.engine.pruning import RunPruned

        if final:  # the final evaluation is the trial's result, not a step to prune at
            return
        if comm.get_world_size() == 1:
            value, prune = self._judge(iteration, results)
        else:
            decision = None
            if comm.is_main_process():  # the evaluation's numbers are rank 0's (the others get {})
                try:
                    decision = ("judged", *self._judge(iteration, results))
                except Exception as e:  # every rank must hear of it, or the others wait for ever
                    decision = ("error", f"{type(e).__name__}: {e}")
            decision = comm.all_gather(decision)[0]
            if decision[0] == "error":
                raise RuntimeError(f"the study's pruner could not judge trial {self.number} at iteration "
                                   f"{iteration}: {decision[1]}")
            _, value, prune = decision
        if prune:
            raise RunPruned(iteration, results, f"{self.metric_task} AP {value:.3f} at iteration {iteration}, "
                                                "judged by the study's pruner")


@contextlib.contextmanager
def _log_to(path: Path):
    """The trial's log in its run dir (train.log, as `peftseg train` leaves one)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(min(old_level, logging.INFO) if old_level else logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def _one_line(exc: BaseException, limit: int = 400) -> str:
    """An error's message on one line (its lines joined by "; "), cut at a word past `limit`."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def run_trial(trial, plan, search_dir: Path, pruner_task: str | None, console) -> tuple[str, Any, Path]:
    """Run one trial; (status, objective values or None, its run dir)."""
    from peftseg.config import compose_config, validate
    from peftseg.engine.distributed import launch_run
    from peftseg.engine.interrupt import RunInterrupted
    from peftseg.engine.pruning import RunPruned
    from peftseg.experiments.objectives import objective_values, shown_values
    from peftseg.results import failed_record, write_record

    sampled = trial_overrides(trial, plan)
    overrides = [*plan.fixed, *sampled]
    try:
        cfg = compose_config(overrides)
    except Exception as exc:  # Hydra refuses a sampled value (a type the key does not take)
        console.print(f"trial {trial.number}: {' '.join(sampled)}\ntrial {trial.number} failed: {_one_line(exc)}",
                      highlight=False, markup=False, soft_wrap=True)
        return "failed", None, search_dir / str(trial.number)
    run_dir = search_dir / f"{trial.number}-{cfg.model.name}-{cfg.method.name}"
    run_id = str(run_dir)
    trial.set_user_attr(RUN_DIR_ATTR, str(run_dir.resolve()))
    console.print(f"trial {trial.number}: {' '.join(sampled)}", highlight=False, markup=False, soft_wrap=True)
    try:
        validate(cfg)  # a sampled value a method refuses: a failed trial, in its own record
    except UserError as exc:
        write_record(run_dir, failed_record(cfg, run_dir, run_id, exc))
        console.print(f"trial {trial.number} failed: {_one_line(exc)} ({run_dir})", highlight=False, markup=False,
                      soft_wrap=True)
        return "failed", None, run_dir
    listener = TrialPruner(trial, pruner_task, plan.options.storage) if pruner_task else None
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _log_to(run_dir / "train.log"):
            record = launch_run(cfg, run_dir, run_id, on_evaluation=listener)
    except RunPruned as pruned:
        console.print(f"trial {trial.number} pruned: {pruned.reason} ({run_dir})", highlight=False, markup=False,
                      soft_wrap=True)
        return "pruned", None, run_dir
    except RunInterrupted:
        raise
    except Exception as exc:  # the run wrote its failed record; the search goes on
        console.print(f"trial {trial.number} failed: {type(exc).__name__}: {_one_line(exc)} ({run_dir}; its "
                      "results.json has the whole error)", highlight=False, markup=False, soft_wrap=True)
        return "failed", None, run_dir
    objective = plan.objective  # as the study takes it (objective=[segm_ap] is segm_ap)
    values = objective_values(record, objective)
    if values is None:
        console.print(f"trial {trial.number} failed: the run ended {record.status} without finite numbers for "
                      f"objective {objective} ({run_dir})", highlight=False, markup=False, soft_wrap=True)
        return "failed", None, run_dir
    console.print(f"trial {trial.number} ok: {shown_values(objective, values)} ({run_dir})", highlight=False,
                  markup=False, soft_wrap=True)
    return "ok", values, run_dir
