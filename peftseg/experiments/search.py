"""The study behind `peftseg search`: an Optuna study over PEFT configurations, kept in a
storage. The command line (options, help) is peftseg/cli/search.py; this is what it calls.

    peftseg search search.n_trials=30 model=vitdet_b dataset=coco train.eval_period=500
    peftseg search 'objective=[segm_ap,trainable_pct,peak_memory]' search.methods=[lora,adapter]

Hydra's override syntax sets the fixed part of the config (`model=…`, `train.max_iter=…`,
`+tracking=mlflow`); Hydra sweep syntax samples a key of your own (`train.base_lr=tag(log,
interval(1e-4,1e-2))`, `train.ims_per_batch=choice(2,4)`). `method` is sampled among the
registered methods (or `search.methods`), and then that method's knobs, which each method
declares in its registration (peftseg.search_space): nothing here lists methods.

The study lives in `search.storage` (an RDB URL such as sqlite:///search.db, or a path: an
Optuna journal file), so the same command resumes it after a crash, and any number of
workers (processes, machines, SLURM jobs) running the same command fill one study:
`search.n_trials` is the study's total, not each worker's. Each trial is one run, recorded
under `search.dir` like any other (`peftseg report <search.dir>` reads them). That folder
is the study's own: by default `search/<study>-<key>`, the key a hash of the storage and the
study's name, and a marker file in it names the study, so two studies (another storage with
the same study name, a storage deleted and created again) never write into one run dir.

What a study was created with (fixed overrides, objective, methods, every sampled range) is
kept in its user attributes; resuming it with another is refused by name, since Optuna
would otherwise mix two search spaces in one study.

Why a worker loop of our own around Optuna's ask/tell instead of `study.optimize`:
- the budget must hold across workers: "is a trial left?" and `ask()` happen under one
  lock (a file lock beside a file storage), so several workers never start more than
  `n_trials` trials between them;
- a trial whose worker died (kill -9, a lost node) must be run again. Optuna's heartbeat
  does this only for RDB storages, and only after its grace period; here each running trial
  carries its worker's host, pid and a heartbeat in its user attributes, so a worker on the
  same host sees a dead pid at once and any worker sees a stale heartbeat, for every storage.
  The lost trial is marked FAIL ("lost") and its parameters are enqueued to run again; the
  enqueued trial (WAITING) stands for it in the budget, and is run by the next worker that
  asks, even when the budget looks used: otherwise a study whose last trial was stopped
  would never reach n_trials.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftseg.errors import UserError
from peftseg.experiments.study_storage import canonical_storage, open_storage, storage_file, wait_for_storage, workers_lock
from peftseg.experiments.search_tracking import track_trial
from peftseg.experiments.trial import run_trial
from peftseg.experiments.trial_workers import (HEARTBEAT_ATTR, RETRY_ATTR, RUN_DIR_ATTR, STATUS_ATTR, WORKER_ATTR,
                                               Heartbeat, counts_toward_budget, reclaim_lost)

log = logging.getLogger(__name__)

FIXED_ATTR = "peftseg.fixed"  # the study's fixed overrides, compared on every resume
OBJECTIVE_ATTR = "peftseg.objective"
METHODS_ATTR = "peftseg.methods"  # the methods sampled among, in order
SPACE_ATTR = "peftseg.space"  # every sampled Optuna parameter and its range
KEY_ATTR = "peftseg.key"  # names the study's folder: search/<study>-<key>
UID_ATTR = "peftseg.uid"  # set when the study is created: tells a study from an earlier one of the same name
MARKER = ".peftseg-study.json"  # in the study's folder: which study it belongs to
AP_OBJECTIVES = {"segm_ap": "segm", "bbox_ap": "bbox"}  # objectives a pruner can follow
PRUNERS = ("auto", "none", "median", "hyperband", "threshold")
SAMPLERS = ("auto", "tpe", "nsgaii", "random")
SUMMARY = "search.json"


@dataclass
class SearchOptions:
    storage: str = "sqlite:///search.db"
    study: str = "peft_search"
    n_trials: int = 20
    methods: list[str] = field(default_factory=list)  # empty: every registered method
    pruner: str = "auto"
    prune_startup: int = 5
    prune_below: float | None = None
    sampler: str = "auto"
    seed: int | None = None
    dir: str = ""
    heartbeat_s: float = 60.0

    def check(self) -> None:
        from peftseg import checks

        checks.integer("search.n_trials", self.n_trials, minimum=1)
        checks.integer("search.prune_startup", self.prune_startup, minimum=0)
        checks.choice("search.pruner", self.pruner, PRUNERS)
        checks.choice("search.sampler", self.sampler, SAMPLERS)
        checks.number("search.heartbeat_s", self.heartbeat_s, low=0, low_open=True,
                      why="a running trial records a heartbeat this often, e.g. search.heartbeat_s=60")
        if self.seed is not None:
            checks.integer("search.seed", self.seed, minimum=0)
        if self.pruner == "threshold" and self.prune_below is None:
            raise UserError("search.pruner=threshold needs search.prune_below=<AP>: a trial whose AP at an "
                            "evaluation is below it is pruned, e.g. search.prune_below=5.")
        if not str(self.storage).strip() or not str(self.study).strip():
            raise UserError("search.storage and search.study must not be empty; e.g. "
                            "search.storage=sqlite:///search.db search.study=peft_search.")
        if not isinstance(self.methods, list) or not all(isinstance(m, str) for m in self.methods):
            raise UserError(f"search.methods={self.methods!r} is not a list of method names; write "
                            "search.methods=[lora,adapter] (or one: search.methods=lora).")
        from peftseg.io.output_guard import unwritable

        where = storage_file(str(self.storage))
        problem = where is not None and unwritable(where)
        if problem:
            raise UserError(f"search.storage={self.storage}: the study's file cannot be written: {problem}. Give a "
                            "path in a writable folder, e.g. search.storage=sqlite:///search.db (a database in the "
                            "working directory) or search.storage=studies/search.log (an Optuna journal).")


@dataclass
class Plan:
    options: SearchOptions
    fixed: list[str]  # Hydra overrides every trial gets
    sampled: list[Any]  # peftseg.search_space knobs over full config keys (Hydra sweep syntax)
    methods: list[str]
    objective: Any = "segm_ap"  # study_objective(): one name, or a list of two or more
    # the storage object open_study opened the study on: seeded samplers load the study from it,
    # and lost trials are failed through it
    storage: Any = None


def study_objective(objective):
    """The objective config value as the study takes it: one name (a string) or a list of two or
    more distinct names; a one-element list is that one name (a single-objective study, which a
    pruner can follow). UserError, before any study is opened, for anything else."""
    from peftseg.experiments.objectives import OBJECTIVES, objective_names

    example = "e.g. objective=segm_ap or 'objective=[segm_ap,trainable_pct]'"
    if isinstance(objective, (list, tuple)):
        odd = [n for n in objective if not isinstance(n, str)]
        if odd:
            raise UserError(f"objective={list(objective)!r}: {odd[0]!r} is not an objective name; give names, "
                            f"{example}; the names are: {', '.join(OBJECTIVES)}.")
        repeated = sorted({n for n in objective if list(objective).count(n) > 1})
        if repeated:
            raise UserError(f"objective={list(objective)!r} names {', '.join(repeated)} more than once; give each "
                            f"objective once, {example}.")
    elif not isinstance(objective, str):
        raise UserError(f"objective={objective!r} is not an objective: give one name or a list of names, {example}; "
                        f"the names are: {', '.join(OBJECTIVES)}.")
    names = objective_names(objective)  # unknown names or an empty list: a UserError naming them
    return names[0] if len(names) == 1 else names


def _describe(knob) -> str:
    from peftseg.search_space import Choice, Int

    if isinstance(knob, Choice):
        return "choice(" + ",".join(str(knob._label(c)) for c in knob.choices) + ")"
    kind = "int" if isinstance(knob, Int) else "float"
    return f"{kind}({knob.low!r},{knob.high!r}{',log' if knob.log else ''})"


def search_space(plan: Plan) -> dict[str, str]:
    """Every Optuna parameter the study samples (as trial_overrides samples them) and its range:
    what a resumed study must still sample from."""
    from peftseg.registry import METHODS

    fixed_keys = {o.split("=", 1)[0].lstrip("+~") for o in plan.fixed} | {k.key for k in plan.sampled}
    space = {knob.key: _describe(knob) for knob in plan.sampled}
    space["method"] = "choice(" + ",".join(plan.methods) + ")" if len(plan.methods) > 1 else plan.methods[0]
    for method in plan.methods:
        for knob in METHODS.get(method).search_space:
            if f"method.{knob.key}" not in fixed_keys:
                space[f"{method}.{knob.key}"] = _describe(knob)
    return space


def _directions(objective) -> list[str]:
    from peftseg.experiments.objectives import directions

    found = directions(objective)
    return [found] if isinstance(found, str) else list(found)


def build_sampler(opts: SearchOptions, n_objectives: int):
    import optuna

    kind = opts.sampler if opts.sampler != "auto" else ("nsgaii" if n_objectives > 1 else "tpe")
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=opts.seed)
    if kind == "nsgaii":
        return optuna.samplers.NSGAIISampler(seed=opts.seed)
    return optuna.samplers.RandomSampler(seed=opts.seed)


def build_pruner(opts: SearchOptions, objective, tcfg):
    """Optuna's pruner for this search (NopPruner: none). Pruning follows an AP objective through the
    periodic evaluations, so it needs one AP objective and train.eval_period > 0."""
    import optuna

    names = [objective] if isinstance(objective, str) else list(objective)
    if opts.pruner == "none":
        return optuna.pruners.NopPruner()  # (create_study's default would be a median pruner)
    usable = len(names) == 1 and names[0] in AP_OBJECTIVES
    if opts.pruner == "auto":
        if not usable or tcfg.eval_period <= 0:
            return optuna.pruners.NopPruner()
        kind = "median"
    else:
        kind = opts.pruner
        if not usable:
            raise UserError(f"search.pruner={kind} follows the mask or box AP through the periodic evaluations, "
                            f"but objective={names} is not one AP (Optuna prunes single-objective studies "
                            "only); use objective=segm_ap, or search.pruner=none.")
        if tcfg.eval_period <= 0:
            raise UserError(f"search.pruner={kind} needs evaluations during training to judge a trial by; "
                            "set train.eval_period=<iterations>, e.g. a quarter of train.max_iter.")
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=opts.prune_startup)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=tcfg.eval_period, max_resource=tcfg.max_iter)
    return optuna.pruners.ThresholdPruner(lower=float(opts.prune_below))


def open_study(plan: Plan, objective, tcfg, say=log.warning):
    """The study (created, or loaded to resume), checked to be the one this command started:
    the same objective and directions, fixed overrides and search space, else UserError."""
    import optuna

    objective = study_objective(objective)
    directions = _directions(objective)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our console says what each trial did
    wait_for_storage(plan.options.storage, say)  # before the workers' lock: others need not wait on it
    # under the lock: workers starting together on a new sqlite file would each create its tables
    with workers_lock(plan.options.storage):
        plan.storage = storage = open_storage(plan.options.storage)
        if plan.options.study not in optuna.get_all_study_names(storage):
            # a new study takes a folder no other study holds: checked before the study is made,
            # so a refusal leaves no empty study behind in the storage
            key = study_key(plan.options.storage, plan.options.study)
            _check_folder(plan, *_folder(plan, key), uid=None, ours=set())
        study = optuna.create_study(
            storage=storage, study_name=plan.options.study, directions=directions, load_if_exists=True,
            sampler=build_sampler(plan.options, len(directions)), pruner=build_pruner(plan.options, objective, tcfg),
        )
        where = f"study {plan.options.study!r} in {plan.options.storage}"
        if [d.name.lower() for d in study.directions] != directions:
            raise UserError(f"{where} optimises {[d.name.lower() for d in study.directions]}, not {directions} of "
                            f"objective={objective}; keep its objective or start another study with "
                            "search.study=<name>.")
        attrs = study.user_attrs
        identity = {FIXED_ATTR: sorted(plan.fixed), OBJECTIVE_ATTR: objective, METHODS_ATTR: plan.methods,
                    SPACE_ATTR: search_space(plan)}
        for key, value in identity.items():
            if key in attrs and _as_created(key, attrs[key]) != value:
                raise UserError(_changed(where, key, attrs[key], value))
        # the folder's key and the uid are the first worker's: the study keeps its folder whatever
        # path its storage has on another machine. (Workers of a server database have no file
        # lock and could race here; the folder's marker then refuses the one that lost.)
        created = {**identity, KEY_ATTR: study_key(plan.options.storage, plan.options.study),
                   UID_ATTR: uuid.uuid4().hex}
        for key, value in created.items():
            if key not in attrs:  # a study made before this attribute existed gets it now
                study.set_user_attr(key, value)
    return study


def _as_created(key: str, value):
    """A stored attribute as this version compares it (a study created with objective=[segm_ap]
    has that one name)."""
    if key == OBJECTIVE_ATTR:
        try:
            return study_objective(value)
        except UserError:
            return value
    return value


def _changed(where: str, key: str, was, now) -> str:
    fix = "Resume it with the same {}, or start another study with search.study=<name>."
    if key == SPACE_ATTR:
        changes = [f"{name}: {was.get(name, 'not sampled')} -> {now.get(name, 'not sampled')}"
                   for name in sorted(set(was) | set(now), key=str) if was.get(name) != now.get(name)]
        return (f"{where} was created with another search space than this command's ({'; '.join(changes)}): its "
                "trials were sampled from the first one, and Optuna would mix the two. " +
                fix.format("search.methods, method=… knobs and sampled ranges (a method's ranges come with "
                           "its registration, so a new peftseg version can change them too)"))
    if key == METHODS_ATTR:
        return (f"{where} was created with search.methods=[{','.join(map(str, was))}], this command has "
                f"[{','.join(now)}]: Optuna would mix the two search spaces. " + fix.format("methods"))
    name = {FIXED_ATTR: "fixed overrides", OBJECTIVE_ATTR: "objective"}[key]
    return f"{where} was created with {name} {was}, this command has {now}. " + fix.format(name)


def study_key(storage: str, study: str) -> str:
    """8 hex digits of the study's identity: the storage (an absolute path for a file, the URL
    without its password for a server) and the study's name."""
    return hashlib.sha256(f"{canonical_storage(storage)}\n{study}".encode()).hexdigest()[:8]


def _folder(plan: Plan, key: str) -> tuple[Path, str]:
    """The study's folder (search.dir, or search/<study>-<key>) and how to name it to the user."""
    opts = plan.options
    if opts.dir:
        return Path(opts.dir), f"search.dir={opts.dir}"
    folder = Path("search") / f"{opts.study}-{key}"
    return folder, f"{folder} (the study's folder)"


def _check_folder(plan: Plan, folder: Path, given: str, uid: str | None, ours: set[str]) -> bool:
    """UserError if `folder` belongs to another study than the one of `uid` (None: a study not
    created yet, which owns no folder): its marker names another, or it holds runs that are
    not among `ours` (the study's trials' run dirs). Whether the folder has its marker."""
    opts = plan.options
    marker = folder / MARKER
    try:
        theirs = json.loads(marker.read_text()) if marker.is_file() else None
    except (OSError, ValueError):
        theirs = {}
    if theirs is not None and (not isinstance(theirs, dict) or uid is None or theirs.get("uid") != uid):
        other = theirs if isinstance(theirs, dict) else {}
        same = other.get("study") == opts.study and other.get("storage") == canonical_storage(opts.storage)
        raise UserError(
            f"{given} holds the trials of another study: {other.get('study')!r} in {other.get('storage')}"
            + (" (a study of the same name that was deleted, or whose storage was made again)" if same else "")
            + f", per its {MARKER}. This study's trials would clear their run dirs. Move that folder away, or "
            "give this study its own: search.dir=<folder> or search.study=<name>.")
    if theirs is None:
        foreign = sorted(str(r.parent) for r in folder.glob("*/results.json") if str(r.parent.resolve()) not in ours)
        if foreign:
            raise UserError(
                f"{given} holds runs that are not trials of study {opts.study!r} in {opts.storage} "
                f"({foreign[0]}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}): this study's "
                "trials would clear their run dirs. Give the study a folder of its own with "
                "search.dir=<folder>, or leave search.dir out.")
    return theirs is not None


def study_dir(plan: Plan, study) -> Path:
    """The folder of the study's run dirs, claimed for this study by a marker file; a folder that
    belongs to another study is refused by name (a trial's run dir would clear that run)."""
    from peftseg.io.atomic import write_json

    opts, attrs = plan.options, study.user_attrs
    folder, given = _folder(plan, attrs[KEY_ATTR])
    with workers_lock(opts.storage):
        ours = {str(Path(t.user_attrs[RUN_DIR_ATTR]).resolve()) for t in study.get_trials(deepcopy=False)
                if RUN_DIR_ATTR in t.user_attrs}
        if not _check_folder(plan, folder, given, attrs[UID_ATTR], ours):
            write_json(folder / MARKER, {"study": opts.study, "storage": canonical_storage(opts.storage),
                                         "uid": attrs[UID_ATTR]})
    return folder


def _seeded(study, storage, opts: SearchOptions, number: int):
    """The study with its sampler seeded for trial `number` (search.seed + number): a seeded
    search samples the same trials whether one worker runs them or several; one seed shared
    by workers would make each of them sample the same configurations."""
    import dataclasses

    import optuna

    sampler = build_sampler(dataclasses.replace(opts, seed=opts.seed + number), len(study.directions))
    return optuna.load_study(study_name=study.study_name, storage=storage, sampler=sampler,
                             pruner=study.pruner)


def _next_trial(study, plan: Plan, grace_s: float):
    """Under the workers' lock: give lost trials back, and ask for a trial if the budget has room.
    (the study object that asked, the trial or None, numbers of trials found lost)"""
    from optuna.trial import TrialState

    with workers_lock(plan.options.storage):
        lost = reclaim_lost(study, plan.storage, grace_s)
        trials = study.get_trials(deepcopy=False)
        # a WAITING trial is a lost one enqueued again: it already counts toward the budget (in
        # place of the lost one), and ask() takes it before sampling anything new
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if not waiting and sum(counts_toward_budget(t) for t in trials) >= plan.options.n_trials:
            return study, None, lost
        asker = study if plan.options.seed is None else _seeded(study, plan.storage, plan.options, len(trials))
        trial = asker.ask()
        trial.set_user_attr(WORKER_ATTR, {"host": socket.gethostname(), "pid": os.getpid()})
        trial.set_user_attr(HEARTBEAT_ATTR, time.time())
        trial.set_user_attr(STATUS_ATTR, "running")
        return asker, trial, lost


def summarize(study, plan: Plan, objective) -> dict:
    """The study as JSON: every trial (state, values, params, run dir) and the best one(s)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = [t.number for t in study.best_trials] if complete else []
    return {
        "study": plan.options.study, "storage": plan.options.storage, "objective": objective,
        "directions": _directions(objective), "n_trials": plan.options.n_trials, "best_trials": best,
        "trials": [{"number": t.number, "state": t.state.name.lower(), "status": t.user_attrs.get(STATUS_ATTR),
                    "values": t.values, "params": t.params, "run_dir": t.user_attrs.get(RUN_DIR_ATTR),
                    "retry_of": t.user_attrs.get(RETRY_ATTR)} for t in trials],
    }


def work(study, plan: Plan, search_dir: Path, pruner_task, grace_s: float, tracker, console) -> int:
    """Run trials until the study's budget is used; how many this worker ran."""
    from optuna.trial import TrialState

    opts, ran = plan.options, 0

    def say(line: str) -> None:  # a store another process holds: said at once, with the wait
        console.print(line, highlight=False, markup=False, soft_wrap=True)

    while True:
        wait_for_storage(opts.storage, say, "No new trial was started; the same command continues the study once "
                         "the storage is free.")  # before the workers' lock: others need not queue behind it
        asker, trial, lost = _next_trial(study, plan, grace_s)
        for number in lost:
            console.print(f"trial {number}: its worker is gone; enqueued to run again", highlight=False, markup=False)
        if trial is None:
            break
        with Heartbeat(trial, opts.heartbeat_s):
            try:
                status, values, run_dir = run_trial(trial, plan, search_dir, pruner_task, console)
            except BaseException:
                # interrupted (SIGTERM/SIGINT) or an error of the search itself: the trial is lost,
                # and the next worker (or the same command again) runs its parameters again
                with workers_lock(opts.storage):
                    trial.set_user_attr(STATUS_ATTR, "lost")
                    study.tell(trial, state=TrialState.FAIL)
                    study.enqueue_trial(trial.params, user_attrs={RETRY_ATTR: trial.number})
                raise
        # the trial ran; still unrecorded past the wait, it stays RUNNING and is run again
        wait_for_storage(opts.storage, say, f"Trial {trial.number} ran ({run_dir}) but is not recorded in the "
                         "study: the same command runs it again once the storage is free.")
        trial.set_user_attr(STATUS_ATTR, status)
        if status == "ok":
            asker.tell(trial, values)
        else:
            asker.tell(trial, state=TrialState.PRUNED if status == "pruned" else TrialState.FAIL)
        ran += 1
        if tracker is not None:
            track_trial(tracker, study, plan, trial.number, run_dir, say)
    return ran
