"""The study behind `peftseg search` (peftseg/cli/search.py): an Optuna study over PEFT
configurations, kept in a storage.

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

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftseg.errors import UserError

log = logging.getLogger(__name__)

STATUS_ATTR = "peftseg.status"  # ok | failed | pruned | lost | running
WORKER_ATTR = "peftseg.worker"  # {"host", "pid"} of the process running the trial
HEARTBEAT_ATTR = "peftseg.heartbeat"  # time.time() of the worker's last sign of life
RUN_DIR_ATTR = "peftseg.run_dir"
RETRY_ATTR = "peftseg.retry_of"  # the number of the lost trial this one runs again
FIXED_ATTR = "peftseg.fixed"  # the study's fixed overrides, compared on every resume
OBJECTIVE_ATTR = "peftseg.objective"
METHODS_ATTR = "peftseg.methods"  # the methods sampled among, in order
SPACE_ATTR = "peftseg.space"  # every sampled Optuna parameter and its range
KEY_ATTR = "peftseg.key"  # names the study's folder: search/<study>-<key>
UID_ATTR = "peftseg.uid"  # set when the study is created: tells a study from an earlier one of the same name
MARKER = ".peftseg-study.json"  # in the study's folder: which study it belongs to
# Optuna's journal file lock (JournalFileSymlinkLock) is a symlink beside the journal; one left by a
# worker killed while it wrote is taken over after this long without a change
JOURNAL_GRACE_S = 30
AP_OBJECTIVES = {"segm_ap": "segm", "bbox_ap": "bbox"}  # objectives a pruner can follow
PRUNERS = ("auto", "none", "median", "hyperband", "threshold")
SAMPLERS = ("auto", "tpe", "nsgaii", "random")
SUMMARY = "search.json"

HELP = """\
usage: peftseg search [search.<option>=…] [Hydra overrides of the fixed config…]

An Optuna study over methods and their knobs (each method declares its ranges), stored in
search.storage so that the same command resumes it and several workers fill it together.
Options (defaults in brackets):
  search.storage=…      sqlite:///search.db, any SQLAlchemy URL, or a file path (Optuna journal)
                        [sqlite:///search.db]
  search.study=…        study name within the storage [peft_search]
  search.n_trials=N     trials in the study in total, over all workers and restarts [20]
  search.methods=[a,b]  methods to sample [every registered method]; or fix one: method=lora
  search.pruner=…       auto | none | median | hyperband | threshold [auto: median when the
                        objective is an AP and train.eval_period > 0]
  search.prune_startup=N  median: trials that finish before any is pruned [5]
  search.prune_below=X  threshold: prune a trial whose AP at an evaluation is below X
  search.sampler=…      auto | tpe | nsgaii | random [auto: TPE, NSGA-II for several objectives]
  search.seed=N         sampler seed; trial k samples with seed N+k, however many workers [none]
  search.dir=…          where the trials' run dirs go, the study's own folder [search/<study>-<key>,
                        the key a hash of the storage and the study name]
  search.heartbeat_s=N  how often a worker says its trial is alive; a trial silent for 3x
                        this is taken as lost and run again [60]
objective=segm_ap (default) or a list, e.g. 'objective=[segm_ap,trainable_pct,peak_memory]'
(multi-objective: NSGA-II, no pruning). Sample keys of your own with Hydra's sweep syntax:
train.base_lr='tag(log,interval(1e-4,1e-2))', train.ims_per_batch='choice(2,4)'.
Browse the study: optuna-dashboard <storage>, e.g. optuna-dashboard sqlite:///search.db
"""


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

        where = _storage_file(str(self.storage))
        problem = where is not None and unwritable(where)
        if problem:
            raise UserError(f"search.storage={self.storage}: the study's file cannot be written: {problem}. Give a "
                            "path in a writable folder, e.g. search.storage=sqlite:///search.db (a database in the "
                            "working directory) or search.storage=studies/search.log (an Optuna journal).")


# --- the command line: search.* options, fixed overrides, sampled keys ---------------------

@dataclass
class Plan:
    options: SearchOptions
    fixed: list[str]  # Hydra overrides every trial gets
    sampled: list[Any]  # peftseg.search_space knobs over full config keys (Hydra sweep syntax)
    methods: list[str]
    objective: Any = "segm_ap"  # study_objective(): one name, or a list of two or more


def _sweep_knob(override):
    """A Hydra sweep override as a search-space knob over its full key."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    from peftseg.search_space import Choice, Float, Int

    key, value = override.get_key_element(), override.value()
    if isinstance(value, IntervalSweep):
        if isinstance(value.start, int) and isinstance(value.end, int):
            return Int(key, value.start, value.end, log="log" in value.tags)
        return Float(key, float(value.start), float(value.end), log="log" in value.tags)
    if isinstance(value, (ChoiceSweep, RangeSweep)):
        return Choice(key, tuple(tuple(v) if isinstance(v, list) else v for v in override.sweep_iterator()))
    raise UserError(f"{override.input_line!r}: glob() is not a search space; use choice(a,b,…), "
                    "range(start,stop,step) or interval(low,high).")


def parse_args(argv: list[str]) -> Plan:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from peftseg.registry import METHODS

    parser = OverridesParser.create()
    options: dict[str, Any] = {}
    fixed, sampled, methods = [], [], None
    for arg in argv:
        if arg in ("-m", "--multirun"):
            raise UserError("peftseg search runs its trials itself: drop -m.")
        try:
            (override,) = parser.parse_overrides([arg])
        except OverrideParseException as e:
            raise UserError(f"cannot read the argument {arg!r}: {e}") from None
        key = override.key_or_group
        if key.startswith("search."):
            name = key.split(".", 1)[1]
            if name not in SearchOptions.__dataclass_fields__:
                raise UserError(f"{key} is not a search option; the options are: "
                                f"{', '.join('search.' + f for f in SearchOptions.__dataclass_fields__)}.")
            if override.is_sweep_override() and name != "methods":
                raise UserError(f"{arg!r}: {key} takes one value, not a list of choices.")
            value = [str(v) for v in override.sweep_iterator()] if override.is_sweep_override() else override.value()
            # search.methods=lora (or lora,adapter: Hydra's choice syntax) means those methods,
            # not the letters of a string
            options[name] = [value] if name == "methods" and isinstance(value, str) else value
        elif key.startswith("hydra.") or key == "hydra" or key.startswith("hydra/"):
            raise UserError(f"{arg!r}: Hydra's own settings do not apply to a search (its trials go to "
                            "search.dir); drop it.")
        elif key == "method" and override.is_sweep_override():
            methods = [str(v) for v in override.sweep_iterator()]
        elif key == "method":
            methods = [str(override.value())]
        elif override.is_sweep_override():
            sampled.append(_sweep_knob(override))
        else:
            fixed.append(arg)
    opts = SearchOptions(**options)
    opts.check()
    if methods is not None and opts.methods:
        raise UserError("give the methods once: either method=… or search.methods=[…], not both.")
    methods = [str(m) for m in (methods or opts.methods or METHODS.names())]
    for name in methods:
        METHODS.get(name)  # a UserError naming the methods there are
    return Plan(opts, fixed, sampled, methods)


def study_objective(objective):
    """The objective config value as the study takes it: one name (a string) or a list of two or
    more distinct names; a one-element list is that one name (a single-objective study, which a
    pruner can follow). UserError, before any study is opened, for anything else."""
    from peftseg.engine.objectives import OBJECTIVES, objective_names

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


# --- storage, study, lock -----------------------------------------------------------------

def _storage_file(storage: str) -> Path | None:
    """The file behind a storage (sqlite database or journal), for the workers' lock."""
    if storage.startswith("sqlite:///"):
        path = storage[len("sqlite:///"):].split("?", 1)[0]  # sqlite:///s.db?timeout=9: the file s.db
        return None if not path or path == ":memory:" else Path(path)
    return None if "://" in storage else Path(storage)


def _still_locked(storage: str, why: str, done: str = "Nothing was run.") -> UserError:
    from peftseg.engine.tracking import STORE_WAIT_S

    return UserError(f"search.storage={storage} is still locked by another process after {STORE_WAIT_S:g} s ({why}). "
                     f"{done} Close what holds it (an open transaction in a sqlite3 shell or a database "
                     "browser, a process that is stuck writing), or use another storage: search.storage=<file>.db "
                     "or a journal file, search.storage=studies/search.log.")


def wait_for_storage(storage: str, say, done: str = "Nothing was run.") -> None:
    """Before the study opens, and before each trial is asked for or told: a sqlite storage
    another process holds is one line through `say` at once and a wait of STORE_WAIT_S at most
    (then UserError, ending with `done`); a journal whose lock file is there is one line saying
    how long Optuna waits before it takes the lock over."""
    from peftseg.engine import tracking

    if "://" in storage:
        path = tracking.sqlite_file(storage)
        held = tracking.wait_for_sqlite(path, f"search.storage={storage}", say) if path else None
        if held:
            raise _still_locked(storage, held, done)
        return
    lock = Path(storage + ".lock")  # the symlink JournalFileSymlinkLock makes beside the journal
    deadline = time.monotonic() + tracking.BUSY_PROBE_S  # another worker's moment of writing is no news
    while os.path.lexists(lock) and time.monotonic() < deadline:
        time.sleep(0.05)
    if os.path.lexists(lock):
        say(f"search.storage={storage} is locked: its lock file {lock} is there (another worker is writing, or "
            f"one was killed while writing); waiting up to {JOURNAL_GRACE_S} s for it, after which Optuna takes "
            "over a lock that has not changed")


def open_storage(storage: str):
    import optuna

    if "://" in storage:
        from peftseg.engine.tracking import STORE_WAIT_S, sqlite_file

        # sqlite: a moment's lock of another worker is waited for as long as a held store is
        # at the start (pysqlite's default is 5 s, then the statement fails)
        kwargs = {"engine_kwargs": {"connect_args": {"timeout": STORE_WAIT_S}}} if sqlite_file(storage) else {}
        try:
            return optuna.storages.RDBStorage(storage, **kwargs)
        except Exception as e:  # a bad URL, a missing driver, a server that does not answer
            if "database is locked" in str(e):
                raise _still_locked(storage, "database is locked") from None
            raise UserError(f"search.storage={storage!r} could not be opened ({type(e).__name__}: {e}); use "
                            "sqlite:///search.db, another SQLAlchemy URL, or a file path for a journal.") from None
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    lock = JournalFileSymlinkLock(storage, grace_period=JOURNAL_GRACE_S)  # Optuna's default lock, its grace ours
    return optuna.storages.JournalStorage(JournalFileBackend(storage, lock_obj=lock))


@contextlib.contextmanager
def workers_lock(storage: str):
    """Mutual exclusion among the workers of one storage, around "is a trial left?" + ask().

    A file storage gets a flock on a file beside it (released by the kernel when a worker
    dies; Linux emulates flock over NFS with byte-range locks). A server database has no
    file to lock: concurrent workers may then start at most one trial each past n_trials."""
    path = _storage_file(storage)
    if path is None:
        yield
        return
    import fcntl

    lock_path = path.with_name(path.name + ".peftseg-lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _directions(objective) -> list[str]:
    from peftseg.engine.objectives import directions

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
        storage = open_storage(plan.options.storage)
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
    return hashlib.sha256(f"{_canonical_storage(storage)}\n{study}".encode()).hexdigest()[:8]


def _canonical_storage(storage: str) -> str:
    path = _storage_file(storage)
    if path is not None:
        return ("sqlite:///" if "://" in storage else "") + str(path.expanduser().resolve())
    if "://" in storage:
        try:
            from sqlalchemy.engine import make_url

            return make_url(storage).render_as_string(hide_password=True)
        except Exception:  # not a URL SQLAlchemy reads: open_storage says so
            return storage
    return storage


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
        same = other.get("study") == opts.study and other.get("storage") == _canonical_storage(opts.storage)
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
            write_json(folder / MARKER, {"study": opts.study, "storage": _canonical_storage(opts.storage),
                                         "uid": attrs[UID_ATTR]})
    return folder


# --- which trials count, and the ones whose worker is gone --------------------------------

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


def reclaim_lost(study, grace_s: float) -> list[int]:
    """Mark lost trials FAIL ("lost") and enqueue their parameters again; their numbers."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    lost = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_lost(trial, grace_s):
            continue
        try:  # through the storage, as Optuna's own fail_stale_trials fails another worker's trial
            study._storage.set_trial_user_attr(trial._trial_id, STATUS_ATTR, "lost")
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
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


# --- one trial ------------------------------------------------------------------------------

def trial_overrides(trial, plan: Plan) -> list[str]:
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


def _pruning_listener(trial, metric_task: str):
    from peftseg.engine.pruning import RunPruned

    def listener(iteration: int, results: dict, final: bool) -> None:
        import math

        if final:  # the final evaluation is the trial's result, not a step to prune at
            return
        value = (results.get(metric_task) or {}).get("AP")
        # NaN (the model predicted nothing) is reported as such: Optuna's pruners prune it
        value = float(value) if isinstance(value, (int, float)) else math.nan
        trial.report(value, step=iteration)
        if trial.should_prune():
            raise RunPruned(iteration, results, f"{metric_task} AP {value:.3f} at iteration {iteration}, "
                                                "judged by the study's pruner")

    return listener


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


def run_trial(trial, plan: Plan, search_dir: Path, pruner_task: str | None, console) -> tuple[str, Any, Path]:
    """Run one trial; (status, objective values or None, its run dir)."""
    from peftseg.config import compose_config, validate
    from peftseg.engine.distributed import launch_run
    from peftseg.engine.interrupt import RunInterrupted
    from peftseg.engine.pruning import RunPruned, on_evaluation
    from peftseg.engine.objectives import objective_values
    from peftseg.results import failed_record, write_record

    sampled = trial_overrides(trial, plan)
    overrides = [*plan.fixed, *sampled]
    try:
        cfg = compose_config(overrides)
    except Exception as exc:  # Hydra refuses a sampled value (a type the key does not take)
        console.print(f"trial {trial.number}: {' '.join(sampled)}\n  failed: {exc}", highlight=False, markup=False,
                      soft_wrap=True)
        return "failed", None, search_dir / str(trial.number)
    run_dir = search_dir / f"{trial.number}-{cfg.model.name}-{cfg.method.name}"
    run_id = str(run_dir)
    trial.set_user_attr(RUN_DIR_ATTR, str(run_dir.resolve()))
    console.print(f"trial {trial.number}: {' '.join(sampled)}", highlight=False, markup=False, soft_wrap=True)
    try:
        validate(cfg)  # a sampled value a method refuses: a failed trial, in its own record
    except UserError as exc:
        write_record(run_dir, failed_record(cfg, run_dir, run_id, exc))
        console.print(f"  failed: {exc}", highlight=False, markup=False, soft_wrap=True)
        return "failed", None, run_dir
    listener = _pruning_listener(trial, pruner_task) if pruner_task else None
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _log_to(run_dir / "train.log"), (on_evaluation(listener) if listener else contextlib.nullcontext()):
            record = launch_run(cfg, run_dir, run_id)
    except RunPruned as pruned:
        console.print(f"  pruned: {pruned.reason}", highlight=False, markup=False, soft_wrap=True)
        return "pruned", None, run_dir
    except RunInterrupted:
        raise
    except Exception as exc:  # the run wrote its failed record; the search goes on
        console.print(f"  failed: {type(exc).__name__}: {exc}", highlight=False, markup=False, soft_wrap=True)
        return "failed", None, run_dir
    objective = plan.objective  # as the study takes it (objective=[segm_ap] is segm_ap)
    values = objective_values(record, objective)
    if values is None:
        console.print(f"  failed: the run ended {record.status} without finite numbers for objective {objective}",
                      highlight=False, markup=False)
        return "failed", None, run_dir
    shown = values if isinstance(values, list) else [values]
    console.print(f"  ok: objective {', '.join(f'{v:.4g}' for v in shown)} ({run_dir})", highlight=False,
                  markup=False, soft_wrap=True)
    return "ok", values, run_dir


# --- MLflow (+tracking=mlflow): the study is a parent run, each trial a child --------------

MLFLOW_PARENT_ATTR = "peftseg.mlflow_parent"


def _tracker(cfg, say=log.warning):
    """The MLflow tracker `+tracking=mlflow` asks for (Hydra callbacks do not run here), its
    start checks done: a store it cannot write, or one another process holds past the wait
    (said at once through `say`), is refused before the first trial."""
    if cfg.get("tracking") is None:
        return None
    from peftseg.engine.tracking import MlflowTracker

    tracker = MlflowTracker(uri=cfg.tracking.uri, experiment=cfg.tracking.experiment)
    tracker.start(say)
    return tracker


def _track_trial(tracker, study, plan: Plan, number: int, run_dir: Path, say=log.warning) -> None:
    from peftseg.engine.tracking import STORE_WAIT_S
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


def _finish_tracking(tracker, study, summary: dict) -> None:
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


# --- the worker loop ------------------------------------------------------------------------

def _seeded(study, opts: SearchOptions, number: int):
    """The study with its sampler seeded for trial `number` (search.seed + number): a seeded
    search samples the same trials whether one worker runs them or several; one seed shared
    by workers would make each of them sample the same configurations."""
    import dataclasses

    import optuna

    sampler = build_sampler(dataclasses.replace(opts, seed=opts.seed + number), len(study.directions))
    return optuna.load_study(study_name=study.study_name, storage=study._storage, sampler=sampler,
                             pruner=study.pruner)


def _next_trial(study, plan: Plan, grace_s: float):
    """Under the workers' lock: give lost trials back, and ask for a trial if the budget has room.
    (the study object that asked, the trial or None, numbers of trials found lost)"""
    from optuna.trial import TrialState

    with workers_lock(plan.options.storage):
        lost = reclaim_lost(study, grace_s)
        trials = study.get_trials(deepcopy=False)
        # a WAITING trial is a lost one enqueued again: it already counts toward the budget (in
        # place of the lost one), and ask() takes it before sampling anything new
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if not waiting and sum(counts_toward_budget(t) for t in trials) >= plan.options.n_trials:
            return study, None, lost
        asker = study if plan.options.seed is None else _seeded(study, plan.options, len(trials))
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


def _work(study, plan: Plan, search_dir: Path, pruner_task, grace_s: float, tracker, console) -> int:
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
            _track_trial(tracker, study, plan, trial.number, run_dir, say)
    return ran


def _first_value(knob) -> str:
    first = knob.choices[0] if hasattr(knob, "choices") else knob.low
    return f"{knob.key}={knob.override(first)}"
