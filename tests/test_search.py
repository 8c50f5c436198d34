"""`peftseg search`: the search space from the registry, a study in a storage that resumes
after a kill and is shared by concurrent workers, pruning recorded as `pruned`."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import records_under
from helpers import HeldSqlite, _in, cli_env, cli_in_process
from peftseg.cli import search as search_cli
from peftseg.experiments import search
from peftseg.experiments import search_tracking
from peftseg.experiments import study_storage
from peftseg.experiments import trial as trial_module
from peftseg.experiments import trial_workers
from peftseg.experiments.study_storage import open_storage
from peftseg.errors import UserError
from peftseg.registry import METHODS, MethodSpec
from peftseg.search_space import Choice, Int

optuna = pytest.importorskip("optuna")

# a trial as small as a real run gets: a few images, two steps; trainable % is the objective
# here because it is a finite number whatever two steps of training predict
TINY = ("train=smoke", "train.max_iter=2", "train.warmup_iters=0", "train.ims_per_batch=2", "train.progress=false",
        "dataset.num_train=8", "dataset.num_val=2",
        # a 2-step model scores below the default 0.05: keep its detections, so each trial has an AP
        "model.score_thresh_test=0.0")
STORAGE_TEST = (*TINY, "objective=trainable_pct", "search.methods=[heads,bitfit,lora]", "search.n_trials=4",
                "search.seed=0")


def _study_trials(storage: str, study: str = "peft_search"):
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def _study_folder(cwd: Path, study: str = "peft_search") -> Path:
    """The one folder of study `study` under cwd/search (search/<study>-<key>)."""
    (folder,) = (cwd / "search").glob(f"{study}-*")
    return folder


def _ask(methods, enqueue: dict | None = None):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    if enqueue:
        study.enqueue_trial(enqueue)
    return study, study.ask()


# --- the search space comes from the registry ---------------------------------------------

def test_every_registered_method_is_in_the_search_space_and_its_samples_validate():
    from peftseg.config import compose_config, validate

    plan = search_cli.parse_args([])
    assert plan.methods == METHODS.names() and len(plan.methods) >= 11
    for name in plan.methods:
        study, trial = _ask(plan.methods, {"method": name})
        overrides = trial_module.trial_overrides(trial, plan)
        spec = METHODS.get(name)
        assert overrides[0] == f"method={name}"
        assert [o.split("=")[0] for o in overrides[1:]] == [f"method.{k.key}" for k in spec.search_space]
        # Optuna saw "method" over every registered method, and each knob under the method's name
        assert trial.distributions["method"].choices == tuple(plan.methods)
        assert set(trial.params) == {"method"} | {f"{name}.{k.key}" for k in spec.search_space}
        validate(compose_config(overrides))  # every sampled configuration is a valid one
    # methods with knobs: their knobs are sampled (not only the method name)
    assert {m.name for m in METHODS if m.search_space} >= {"lora", "loha", "lokr", "vera", "ia3", "adapter",
                                                            "side", "adapter_lora"}


def test_a_method_added_to_the_registry_becomes_searchable_without_a_list_edit():
    spec = MethodSpec("throwaway", config=object, apply=lambda m, c: m, summary="test only",
                      search_space=(Int("width", 2, 4), Choice("where", (("a", "b"), ("c",)))))
    METHODS.add(spec)
    try:
        plan = search_cli.parse_args(["search.sampler=random"])
        assert "throwaway" in plan.methods
        study, trial = _ask(plan.methods, {"method": "throwaway", "throwaway.where": "a,b"})
        overrides = trial_module.trial_overrides(trial, plan)
        assert overrides[0] == "method=throwaway" and overrides[2] == "method.where=[a,b]"
        assert overrides[1].startswith("method.width=") and 2 <= int(overrides[1].split("=")[1]) <= 4
        # a knob the user fixed on the command line is left as the user set it
        plan = search_cli.parse_args(["method=throwaway", "method.width=3"])
        assert plan.methods == ["throwaway"] and plan.fixed == ["method.width=3"]
        study, trial = _ask(plan.methods, {"throwaway.where": "c"})
        assert trial_module.trial_overrides(trial, plan) == ["method=throwaway", "method.where=[c]"]
    finally:
        METHODS._specs.pop("throwaway")


def test_hydra_sweep_syntax_samples_keys_of_ones_own():
    plan = search_cli.parse_args(["train.base_lr=tag(log,interval(1e-4,1e-2))", "train.ims_per_batch=choice(2,4)",
                              "method=lora,adapter", "train=smoke"])
    assert plan.methods == ["lora", "adapter"] and plan.fixed == ["train=smoke"]
    study, trial = _ask(plan.methods)
    overrides = trial_module.trial_overrides(trial, plan)
    lr = float(next(o for o in overrides if o.startswith("train.base_lr=")).split("=")[1])
    assert 1e-4 <= lr <= 1e-2 and trial.distributions["train.base_lr"].log
    assert next(o for o in overrides if o.startswith("train.ims_per_batch=")) in ("train.ims_per_batch=2",
                                                                                   "train.ims_per_batch=4")


@pytest.mark.parametrize("args, message", [
    (["search.n_trial=3"], "search.n_trial is not a search option"),
    (["search.pruner=sometimes"], "search.pruner='sometimes' is not one of the choices"),
    (["search.pruner=threshold"], "search.pruner=threshold needs search.prune_below"),
    (["method=lora", "search.methods=[adapter]"], "give the methods once"),
    (["search.methods=[lorra]"], "method 'lorra' is not known"),
    (["hydra.run.dir=x"], "Hydra's own settings do not apply"),
    (["-m"], "drop -m"),
])
def test_bad_search_options_name_the_fix(args, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        search_cli.parse_args(args)


def test_the_command_explains_itself_and_refuses_bad_input_without_a_traceback(tmp_path, shapes_cache):
    shown = cli_in_process("search", "--help", cwd=tmp_path, cache=shapes_cache)
    assert shown.returncode == 0 and "optuna-dashboard <storage>" in shown.stdout
    assert "search.n_trials=N" in shown.stdout and "[sqlite:///search.db]" in shown.stdout
    bad = cli_in_process("search", "search.n_trials=0", cwd=tmp_path, cache=shapes_cache)
    assert bad.returncode == 2 and "search.n_trials" in bad.stderr and "Traceback" not in bad.stderr
    typo = cli_in_process("search", "model=vitdet_tinyy", cwd=tmp_path, cache=shapes_cache)
    assert typo.returncode == 2 and "Unknown model 'vitdet_tinyy'" in typo.stderr
    assert not (tmp_path / "search.db").exists()  # nothing opened for a command that cannot run


def test_pruning_needs_one_ap_objective_and_periodic_evaluation():
    from peftseg.config import TrainConfig

    opts = search.SearchOptions(pruner="median")
    with pytest.raises(UserError, match="is not one AP"):
        search.build_pruner(opts, ["segm_ap", "trainable_pct"], TrainConfig(eval_period=10))
    with pytest.raises(UserError, match="set train.eval_period"):
        search.build_pruner(opts, "segm_ap", TrainConfig(eval_period=0))
    assert isinstance(search.build_pruner(opts, "segm_ap", TrainConfig(eval_period=10)), optuna.pruners.MedianPruner)
    auto = search.SearchOptions()
    assert isinstance(search.build_pruner(auto, "segm_ap", TrainConfig(eval_period=0)), optuna.pruners.NopPruner)
    assert isinstance(search.build_pruner(auto, "segm_ap", TrainConfig(eval_period=5)), optuna.pruners.MedianPruner)
    hyper = search.build_pruner(search.SearchOptions(pruner="hyperband"), "bbox_ap", TrainConfig(eval_period=5, max_iter=50, warmup_iters=0))
    assert isinstance(hyper, optuna.pruners.HyperbandPruner)
    # several objectives: NSGA-II
    assert isinstance(search.build_sampler(auto, 3), optuna.samplers.NSGAIISampler)
    assert isinstance(search.build_sampler(auto, 1), optuna.samplers.TPESampler)


def test_a_trial_whose_worker_died_is_failed_as_lost_and_enqueued_again(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=storage, study_name="s")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial = study.ask()
    trial.suggest_categorical("method", ["lora", "adapter"])
    trial.set_user_attr(trial_workers.WORKER_ATTR, {"host": os.uname().nodename, "pid": dead.pid})
    alive = study.ask()  # this process's own trial: alive, and its heartbeat is fresh
    alive.set_user_attr(trial_workers.WORKER_ATTR, {"host": os.uname().nodename, "pid": os.getpid()})
    alive.set_user_attr(trial_workers.HEARTBEAT_ATTR, time.time())
    assert trial_workers.reclaim_lost(study, open_storage(storage), grace_s=3600) == [trial.number]
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["FAIL", "RUNNING", "WAITING"]
    assert trials[0].user_attrs[trial_workers.STATUS_ATTR] == "lost" and not trial_workers.counts_toward_budget(trials[0])
    assert trials[2].system_attrs["fixed_params"] == trials[0].params  # the same configuration again
    assert trials[2].user_attrs[trial_workers.RETRY_ATTR] == trial.number
    # a stale heartbeat is lost too, wherever its worker ran
    alive.set_user_attr(trial_workers.WORKER_ATTR, {"host": "elsewhere", "pid": 1})
    alive.set_user_attr(trial_workers.HEARTBEAT_ATTR, time.time() - 100)
    assert trial_workers.reclaim_lost(study, open_storage(storage), grace_s=60) == [alive.number]


def test_resuming_a_study_with_other_fixed_overrides_or_objective_is_refused(tmp_path):
    from peftseg.config import TrainConfig

    storage = f"sqlite:///{tmp_path / 'search.db'}"
    first = search_cli.parse_args(["train.max_iter=10", f"search.storage={storage}"])
    study = search.open_study(first, "segm_ap", TrainConfig())
    assert study.user_attrs[search.FIXED_ATTR] == ["train.max_iter=10"]
    assert search.open_study(first, "segm_ap", TrainConfig()).study_name == "peft_search"  # the same: resumes
    other = search_cli.parse_args(["train.max_iter=20", f"search.storage={storage}"])
    with pytest.raises(UserError, match=r"was created with fixed overrides \['train.max_iter=10'\], this command has"):
        search.open_study(other, "segm_ap", TrainConfig())
    with pytest.raises(UserError, match="optimises \\['maximize'\\], not \\['minimize'\\]"):
        search.open_study(first, "trainable_pct", TrainConfig())


def test_resuming_a_study_with_another_search_space_is_refused_by_name(tmp_path):
    from peftseg.config import TrainConfig

    storage = f"sqlite:///{tmp_path / 'search.db'}"
    first = search_cli.parse_args([f"search.storage={storage}", "search.methods=[heads,lora]",
                               "train.base_lr=tag(log,interval(1e-4,1e-2))"])
    study = search.open_study(first, "segm_ap", TrainConfig())
    space = study.user_attrs[search.SPACE_ATTR]
    assert study.user_attrs[search.METHODS_ATTR] == ["heads", "lora"]
    assert space["method"] == "choice(heads,lora)" and space["train.base_lr"] == "float(0.0001,0.01,log)"
    assert set(space) == {"method", "train.base_lr"} | {f"lora.{k.key}" for k in METHODS.get("lora").search_space}
    # the same command, and objective=[segm_ap] (the same one objective): it resumes
    assert search.open_study(first, ["segm_ap"], TrainConfig()).study_name == "peft_search"
    other_methods = search_cli.parse_args([f"search.storage={storage}", "search.methods=[heads,bitfit]",
                                       "train.base_lr=tag(log,interval(1e-4,1e-2))"])
    with pytest.raises(UserError) as refused:
        search.open_study(other_methods, "segm_ap", TrainConfig())
    assert str(refused.value) == (
        f"study 'peft_search' in {storage} was created with search.methods=[heads,lora], this command has "
        "[heads,bitfit]: Optuna would mix the two search spaces. Resume it with the same methods, or start "
        "another study with search.study=<name>.")
    other_range = search_cli.parse_args([f"search.storage={storage}", "search.methods=[heads,lora]",
                                     "train.base_lr=tag(log,interval(1e-5,1e-2))"])
    with pytest.raises(UserError, match=r"was created with another search space than this command's "
                                        r"\(train.base_lr: float\(0.0001,0.01,log\) -> float\(1e-05,0.01,log\)\)"):
        search.open_study(other_range, "segm_ap", TrainConfig())
    with pytest.raises(UserError, match=r"was created with objective segm_ap, this command has bbox_ap\. "):
        search.open_study(first, "bbox_ap", TrainConfig())  # the same direction, another objective
    assert len(optuna.get_all_study_names(storage)) == 1 and not _study_trials(storage)  # nothing added


def test_two_studies_never_share_a_folder_of_run_dirs(tmp_path):
    from peftseg.config import TrainConfig

    folders = []
    with _in(tmp_path, tmp_path):
        for name in ("a.db", "b.db"):  # the same study name (the default) in two storages
            plan = search_cli.parse_args([f"search.storage=sqlite:///{name}"])
            study = search.open_study(plan, "segm_ap", TrainConfig())
            folders.append(search.study_dir(plan, study))
        assert folders[0] != folders[1] and all(f.parent == Path("search") for f in folders)
        assert folders[0].name == f"peft_search-{search.study_key('sqlite:///a.db', 'peft_search')}"
        marker = json.loads((folders[0] / search.MARKER).read_text())
        assert marker["storage"] == f"sqlite:///{tmp_path / 'a.db'}" and marker["study"] == "peft_search"
        # a.db deleted and made again: a new study of the same name, refused the first one's folder,
        # before the new study is made
        Path("a.db").unlink()
        plan = search_cli.parse_args(["search.storage=sqlite:///a.db"])
        with pytest.raises(UserError) as refused:
            search.open_study(plan, "segm_ap", TrainConfig())
        assert str(refused.value) == (
            f"{folders[0]} (the study's folder) holds the trials of another study: 'peft_search' in "
            f"sqlite:///{tmp_path / 'a.db'} (a study of the same name that was deleted, or whose storage was made "
            f"again), per its {search.MARKER}. This study's trials would clear their run dirs. Move that folder "
            "away, or give this study its own: search.dir=<folder> or search.study=<name>.")
        assert optuna.get_all_study_names("sqlite:///a.db") == []
        # search.dir given: another study's folder, or one with runs of its own, is refused too
        plan = search_cli.parse_args(["search.storage=sqlite:///c.db", f"search.dir={folders[1]}"])
        with pytest.raises(UserError, match=r"holds the trials of another study: 'peft_search' in sqlite:///.*b\.db, per"):
            search.open_study(plan, "segm_ap", TrainConfig())
        Path("runs/3-vitdet_tiny-lora").mkdir(parents=True)
        Path("runs/3-vitdet_tiny-lora/results.json").write_text("{}")
        plan = search_cli.parse_args(["search.storage=sqlite:///c.db", "search.dir=runs"])
        with pytest.raises(UserError, match=r"search.dir=runs holds runs that are not trials of study 'peft_search' "
                                            r"in sqlite:///c.db \(runs/3-vitdet_tiny-lora\)"):
            search.open_study(plan, "segm_ap", TrainConfig())


@pytest.mark.parametrize("objective, message", [
    ("[[segm_ap]]", "objective=[['segm_ap']]: ['segm_ap'] is not an objective name; give names"),
    ("[segm_ap,segm_ap]", "objective=['segm_ap', 'segm_ap'] names segm_ap more than once; give each objective once"),
    ("[]", "objective=[] is not a known objective"),
    ("[segm_ap,map]", "objective=['segm_ap', 'map'] is not a known objective"),
    ("5", "objective=5 is not an objective: give one name or a list of names"),
])
def test_objective_lists_of_any_length_are_checked_before_the_study_opens(tmp_path, shapes_cache, objective,
                                                                          message):
    proc = cli_in_process("search", f"objective={objective}", "search.n_trials=1", cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: {message}"), proc.stderr
    assert not (tmp_path / "search.db").exists() and not (tmp_path / "search").exists()


def test_a_locked_sqlite_storage_is_one_line_at_once_then_a_bounded_wait(tmp_path, shapes_cache, monkeypatch):
    from peftseg.config import TrainConfig
    from peftseg.experiments import tracking

    storage = f"sqlite:///{tmp_path / 'search.db'}"
    held = HeldSqlite(tmp_path / "search.db")
    said = []

    def say(line):  # the line comes before the wait: the lock is released only once it is said
        said.append(line)
        held.release()

    study = search.open_study(search_cli.parse_args([f"search.storage={storage}"]), "segm_ap", TrainConfig(), say)
    assert said == [f"search.storage={storage} is locked by another process (database is locked); waiting up to "
                    f"{tracking.STORE_WAIT_S:g} s for it to be released"]
    assert study.study_name == "peft_search"
    # held past the wait: one paragraph, exit 2, no trial
    monkeypatch.setattr(tracking, "STORE_WAIT_S", 0.2)
    monkeypatch.setattr(tracking, "BUSY_PROBE_S", 0.0)
    held = HeldSqlite(tmp_path / "search.db")
    try:
        proc = cli_in_process("search", f"search.storage={storage}", "search.n_trials=1", "method=heads",
                              cwd=tmp_path, cache=shapes_cache)
    finally:
        held.release()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0] == (f"search.storage={storage} is locked by another process (database is "
                                           "locked); waiting up to 0.2 s for it to be released")
    assert proc.stderr == (
        f"error: search.storage={storage} is still locked by another process after 0.2 s (database is locked). "
        "Nothing was run. Close what holds it (an open transaction in a sqlite3 shell or a database browser, a "
        "process that is stuck writing), or use another storage: search.storage=<file>.db or a journal file, "
        "search.storage=studies/search.log.\n")
    assert not _study_trials(storage)


def test_a_storage_locked_between_trials_is_said_at_once_and_waited_for(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from peftseg.config import TrainConfig
    from peftseg.experiments import tracking

    storage = f"sqlite:///{tmp_path / 'search.db'}"
    plan = search_cli.parse_args([f"search.storage={storage}", "method=heads", "search.n_trials=1"])
    plan.objective = "trainable_pct"
    study = search.open_study(plan, plan.objective, TrainConfig())
    held = []

    def run_trial(trial, plan, search_dir, pruner_task, console):  # a trial, and then the storage is locked
        held.append(HeldSqlite(tmp_path / "search.db"))
        return "ok", 1.5, search_dir / "0-vitdet_tiny-heads"

    class Out(io.StringIO):
        def write(self, text):  # the line is out before the wait: only then does the lock go
            if "is locked by another process" in text:
                held[-1].release()
            return super().write(text)

    monkeypatch.setattr(search, "run_trial", run_trial)
    out = Out()
    assert search.work(study, plan, tmp_path / "search", None, 180.0, None, Console(file=out, width=300)) == 1
    assert out.getvalue().splitlines() == [f"search.storage={storage} is locked by another process (database is "
                                           f"locked); waiting up to {tracking.STORE_WAIT_S:g} s for it to be released"]
    (trial,) = _study_trials(storage)
    assert trial.state.name == "COMPLETE" and trial.values == [1.5]


def test_an_mlflow_store_locked_mid_search_leaves_the_trial_untracked_with_one_warning(tmp_path, monkeypatch,
                                                                                       caplog):
    from peftseg.experiments import tracking

    monkeypatch.setattr(tracking, "STORE_WAIT_S", 0.2)
    monkeypatch.setattr(tracking, "BUSY_PROBE_S", 0.0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    said = []
    held = HeldSqlite(tmp_path / "mlflow.db")
    try:
        with caplog.at_level(logging.WARNING, logger="peftseg.experiments.search_tracking"):
            search_tracking.track_trial(tracking.MlflowTracker(uri=uri), optuna.create_study(),
                                search_cli.parse_args([f"search.storage=sqlite:///{tmp_path / 's.db'}"]), 3,
                                tmp_path / "3-vitdet_tiny-heads", said.append)
    finally:
        held.release()
    assert said == [f"mlflow: the store {uri} is locked by another process (database is locked); waiting up to "
                    "0.2 s for it to be released"]
    assert [r.getMessage() for r in caplog.records if r.name == "peftseg.experiments.search_tracking"] == [
        "MLflow: trial 3 not tracked: its store is still locked by another process after 0.2 s (database is locked)"]


def test_a_journal_whose_lock_file_is_there_says_how_long_optuna_waits(tmp_path):
    from optuna.storages.journal import JournalFileSymlinkLock

    from peftseg.config import TrainConfig

    journal = tmp_path / "search.log"
    journal.touch()
    # the lock file named in the line is the one Optuna's journal lock makes
    lock = JournalFileSymlinkLock(str(journal))
    lock.acquire()
    assert os.path.islink(f"{journal}.lock")
    said = []

    def say(line):
        said.append(line)
        lock.release()  # as the worker that held it would, once it wrote

    search.open_study(search_cli.parse_args([f"search.storage={journal}"]), "segm_ap", TrainConfig(), say)
    assert said == [f"search.storage={journal} is locked: its lock file {journal}.lock is there (another worker is "
                    f"writing, or one was killed while writing); waiting up to {study_storage.JOURNAL_GRACE_S} s for it, "
                    "after which Optuna takes over a lock that has not changed"]
    assert not os.path.lexists(f"{journal}.lock")


def test_an_mlflow_store_failing_mid_search_is_a_warning_not_a_crash(tmp_path, caplog):
    class Failing:  # as MlflowTracker when its store fails after the first trial
        def wait_for_store(self, say):
            return None  # free when looked at, failing a moment later

        def start_parent(self, *args, **kwargs):
            raise RuntimeError("database is locked")

        def log_run(self, *args, **kwargs):
            raise AssertionError("a trial is not logged without its parent run")

    study = optuna.create_study()
    plan = search_cli.parse_args([f"search.storage=sqlite:///{tmp_path / 's.db'}"])
    with caplog.at_level(logging.WARNING, logger="peftseg.experiments.search_tracking"):
        search_tracking.track_trial(Failing(), study, plan, 0, tmp_path / "0-vitdet_tiny-heads")
    assert [r.getMessage() for r in caplog.records if r.name == "peftseg.experiments.search_tracking"] == [
        "MLflow: trial 0 not tracked, the study's parent run could not be made: RuntimeError: database is locked"]
    assert search_tracking.MLFLOW_PARENT_ATTR not in study.user_attrs  # the next trial tries again


# --- pruning, in process ------------------------------------------------------------------

def test_a_pruned_trial_is_recorded_pruned_not_ok(tmp_path, shapes_cache):
    import io

    from rich.console import Console

    storage = f"sqlite:///{tmp_path / 'search.db'}"
    console = Console(file=io.StringIO(), width=300)
    # every AP is below 101: the threshold pruner stops the trial at its first evaluation
    # objective=[segm_ap], a one-element list, is the one objective segm_ap: a pruner follows it
    args = [*TINY, "train.max_iter=3", "train.eval_period=1", "search.methods=[heads]", "search.n_trials=1",
            "objective=[segm_ap]",
            "search.pruner=threshold", "search.prune_below=101", f"search.storage={storage}",
            "+tracking=mlflow", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    with _in(tmp_path, shapes_cache):
        assert search_cli.main(args, console) == 0
    (record,) = records_under(tmp_path / "search")
    assert record["status"] == "pruned"
    assert record["pruned"]["iteration"] == 1 and "judged by the study's pruner" in record["pruned"]["reason"]
    assert "segm" in record["metrics"]  # the evaluation it was pruned at, under status pruned
    (trial,) = _study_trials(storage)
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [1]
    assert trial.user_attrs[trial_workers.STATUS_ATTR] == "pruned"
    # the trial says so on one line: why, and where its run is
    run_dir = _study_folder(tmp_path).relative_to(tmp_path) / "0-vitdet_tiny-heads"
    assert f"trial 0 pruned: {record['pruned']['reason']} ({run_dir})" in console.file.getvalue().splitlines()
    summary = json.loads((_study_folder(tmp_path) / "search.json").read_text())
    assert [t["state"] for t in summary["trials"]] == ["pruned"] and summary["objective"] == "segm_ap"
    # peftseg report reads the trial as pruned: not a result, not counted ok
    report = cli_in_process("report", str(tmp_path / "search"), cwd=tmp_path, cache=shapes_cache)
    assert report.returncode == 0, report.stdout + report.stderr
    assert "pruned" in report.stdout and "1 runs (1 not ok)" in report.stdout
    # +tracking=mlflow: the study is a parent run, the trial its child, KILLED (not FINISHED) as pruned
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("peftseg").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("peftseg.kind") == "search"]
    (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and parent.data.params["search.storage"] == storage
    assert child.info.status == "KILLED" and child.data.tags["peftseg.status"] == "pruned"
    assert child.data.tags["peftseg.trial"] == "0" and child.data.params["method.name"] == "heads"


def test_a_multi_objective_search_keeps_the_pareto_set(tmp_path, shapes_cache):
    from rich.console import Console

    storage = f"sqlite:///{tmp_path / 'search.db'}"
    args = [*TINY, "objective=[trainable_pct,peak_memory]", "search.methods=[heads,bitfit,lora]", "search.n_trials=3",
            "search.seed=1", f"search.storage={storage}"]
    with _in(tmp_path, shapes_cache):
        assert search_cli.main(args, Console(file=open(os.devnull, "w"))) == 0
    study = optuna.load_study(study_name="peft_search", storage=storage)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    summary = json.loads((_study_folder(tmp_path) / "search.json").read_text())
    points = {}
    for t in summary["trials"]:
        record = json.loads((Path(t["run_dir"]) / "results.json").read_text())
        assert t["state"] == "complete" and record["status"] == "ok"
        assert t["values"] == pytest.approx([100 * record["params"]["ratio"],
                                             record["efficiency"]["peak_memory_bytes"] / 2 ** 30])
        points[t["number"]] = tuple(t["values"])
    front = [n for n, p in points.items()
             if not any(q != p and q[0] <= p[0] and q[1] <= p[1] for q in points.values())]
    assert sorted(summary["best_trials"]) == sorted(front)


def test_trials_end_with_labelled_rounded_objectives_and_the_best_with_its_train_command(tmp_path, shapes_cache):
    import re
    import shlex

    from peftseg.config import compose_config
    from peftseg.results import flatten_config

    storage = f"sqlite:///{tmp_path / 'search.db'}"
    fixed = [*TINY, "objective=[segm_ap,trainable_pct]"]
    proc = cli_in_process("search", *fixed, "search.methods=[heads,lora]", "search.n_trials=2", "search.seed=0",
                          f"search.storage={storage}", cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    summary = json.loads((_study_folder(tmp_path) / "search.json").read_text())
    folder = _study_folder(tmp_path).relative_to(tmp_path)
    started = {}
    for t in summary["trials"]:
        n, (ap, pct) = t["number"], t["values"]
        run_dir = folder / f"{n}-vitdet_tiny-{t['params']['method']}"
        # when it ends, each trial says how it did, its objectives named and rounded
        assert f"trial {n} ok: segm_ap {ap:.2f}, trainable_pct {pct:.2f} ({run_dir})" in lines
        (start,) = [line for line in lines if line.startswith(f"trial {n}: method=")]
        started[n] = start.split(": ", 1)[1].split()
    best = summary["best_trials"]
    assert best and lines.count(f"best trials: the {len(best)} on the Pareto front of segm_ap (higher is better) "
                                "and trainable_pct (lower is better)") == 1
    for n in best:
        t = summary["trials"][n]
        at = lines.index(f"best: trial {n}: segm_ap {t['values'][0]:.2f}, trainable_pct {t['values'][1]:.2f}")
        sampled, where, command = lines[at + 1:at + 4]
        # what it sampled, floats rounded (method.alpha=5.703); the command below keeps them whole
        shown = sampled.removeprefix("  sampled: ").split()
        assert [o.split("=")[0] for o in shown] == [o.split("=")[0] for o in started[n]]
        for short, whole in zip(shown, started[n]):
            value = whole.split("=", 1)[1]
            assert short == whole or float(short.split("=", 1)[1]) == pytest.approx(float(value), rel=1e-3)
        assert where == f"  run dir: {folder / Path(t['run_dir']).name}"
        assert re.fullmatch(r"  train it: peftseg train .*", command)
        words = shlex.split(command.split(": ", 1)[1])
        assert words[:2] == ["peftseg", "train"] and words[2:] == [*fixed, *started[n]]
        # the command trains the very configuration the trial ran
        record = json.loads((Path(t["run_dir"]) / "results.json").read_text())
        assert flatten_config(compose_config(words[2:])) == record["config"]


def test_a_best_trial_shows_its_sampled_floats_rounded_and_its_command_exact(tmp_path):
    from peftseg.config import TrainConfig

    plan = search_cli.parse_args([f"search.storage=sqlite:///{tmp_path / 's.db'}", "method=heads", "train=smoke",
                                  "train.base_lr=tag(log,interval(1e-4,1e-2))"])
    plan.objective = "segm_ap"
    study = search.open_study(plan, plan.objective, TrainConfig())
    trial = study.ask()
    trial.suggest_float("train.base_lr", 1e-4, 1e-2, log=True)
    trial.set_user_attr(trial_workers.RUN_DIR_ATTR, str(tmp_path / "search" / "0-vitdet_tiny-heads"))
    study.tell(trial, 41.2749)
    lr = study.trials[0].params["train.base_lr"]
    assert search_cli.best_lines(study, plan, search.summarize(study, plan, plan.objective)) == [
        "best: trial 0: segm_ap 41.27",
        f"  sampled: method=heads train.base_lr={lr:.4g}",
        f"  run dir: {tmp_path / 'search' / '0-vitdet_tiny-heads'}",
        f"  train it: peftseg train train=smoke method=heads train.base_lr={lr!r}"]


@pytest.mark.parametrize("name, value, shown", [
    ("segm_ap", 41.2749, "41.27"), ("bbox_ap", 0.0, "0.00"), ("trainable_pct", 2.31347, "2.31"),
    ("trainable_pct", 66.897447, "66.90"), ("trainable_pct", 0.0123456, "0.0123"),
    ("trainable_params", 1234567.0, "1,234,567"), ("peak_memory", 3.2149, "3.21 GiB"),
    ("step_time", 0.04567, "0.0457 s"), ("checkpoint_mb", 1234.567, "1234.57"),
])
def test_objective_values_are_shown_rounded_in_plain_notation(name, value, shown):
    from peftseg.experiments.objectives import shown_value, shown_values

    assert shown_value(name, value) == shown
    assert shown_values([name, "segm_ap"], [value, 12.0]) == f"{name} {shown}, segm_ap 12.00"


# --- storage: resume after a kill, concurrent workers (the CLI is what is tested) ---------

def _cli(cwd: Path, cache: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "peftseg.cli", "search", *args], cwd=cwd, env=cli_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _check_complete_study(tmp_path: Path, storage: str, n: int):
    trials = _study_trials(storage)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == n
    # every other trial was lost with its worker and ran again as a later one
    lost = [t for t in trials if t.state.name != "COMPLETE"]
    assert all(t.state.name == "FAIL" and t.user_attrs[trial_workers.STATUS_ATTR] == "lost" for t in lost)
    assert sorted(t.user_attrs[trial_workers.RETRY_ATTR] for t in complete if trial_workers.RETRY_ATTR in t.user_attrs) == \
        sorted(t.number for t in lost)
    # one run dir per trial, each with its own ok record whose trainable % is the trial's value
    dirs = [Path(t.user_attrs[trial_workers.RUN_DIR_ATTR]) for t in complete]
    assert len(set(dirs)) == n
    for t, run_dir in zip(complete, dirs):
        record = json.loads((run_dir / "results.json").read_text())
        assert record["status"] == "ok" and record["config"]["method.name"] == t.params["method"]
        assert t.values[0] == pytest.approx(100 * record["params"]["ratio"])
    return trials


def test_a_killed_search_resumes_to_its_total_with_the_same_command(tmp_path, shapes_cache):
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    args = (*STORAGE_TEST, f"search.storage={storage}")
    proc = _cli(tmp_path, shapes_cache, *args)
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            # the study's tables exist once a trial trains (reading sooner would race their creation)
            if list(tmp_path.glob("search/peft_search-*/*/results.json")):
                try:
                    trials = _study_trials(storage)
                except Exception:  # the study is being created
                    continue
                # two trials done, the third one training (its "running" record written)
                training = [t for t in trials if t.state.name == "RUNNING" and trial_workers.RUN_DIR_ATTR in t.user_attrs
                            and (Path(t.user_attrs[trial_workers.RUN_DIR_ATTR]) / "results.json").exists()]
                if sum(t.state.name == "COMPLETE" for t in trials) >= 2 and training:
                    break
        assert proc.poll() is None, "the search ended before it could be killed: " + proc.stdout.read()[-3000:]
        proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: as a crashed node
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = _study_trials(storage)
    assert sum(t.state.name == "COMPLETE" for t in before) == 2
    again = _cli(tmp_path, shapes_cache, *args)
    out, _ = again.communicate(timeout=500)
    assert again.returncode == 0, out[-3000:]
    trials = _check_complete_study(tmp_path, storage, 4)
    (lost,) = [t for t in trials if t.state.name == "FAIL"]  # trial 2, killed while it trained
    assert lost.number == 2 and "trial 2: its worker is gone; enqueued to run again" in out
    record = json.loads((Path(lost.user_attrs[trial_workers.RUN_DIR_ATTR]) / "results.json").read_text())
    assert record["status"] == "failed" and record["error"]["type"] == "WorkerLost"  # not "running" forever
    assert [t.number for t in trials if t.state.name == "COMPLETE"] == [0, 1, 3, 4]
    assert "study 'peft_search': 4 complete, 0 pruned, 0 failed" in out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_search_stopped_in_its_last_trial_reaches_its_total_with_the_same_command(tmp_path, shapes_cache, sig):
    """The stopped trial is enqueued to run again (SIGTERM: by its worker; kill -9: by the next
    one); the same command runs it, though the budget looks used, and the stopped one counts once."""
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    # 8 steps: the trial is still in its run when its "running" record is seen
    args = (*TINY, "train.max_iter=8", "objective=trainable_pct", "search.methods=[heads]", "search.n_trials=1",
            f"search.storage={storage}")
    proc = _cli(tmp_path, shapes_cache, *args)
    try:
        while proc.poll() is None:
            time.sleep(0.1)
            found = list(tmp_path.glob("search/peft_search-*/0-*/results.json"))
            if found and json.loads(found[0].read_text() or "{}").get("status") == "running":
                break
        assert proc.poll() is None, "the search ended before it could be stopped: " + proc.stdout.read()[-3000:]
        proc.send_signal(sig)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (143 if sig == signal.SIGTERM else -9), out[-3000:]
    if sig == signal.SIGTERM:  # its worker marked it lost and enqueued it, which used to fill the budget
        assert "the trial in progress was enqueued to run again: the same command continues the study" in out
        assert [(t.number, t.state.name) for t in _study_trials(storage)] == [(0, "FAIL"), (1, "WAITING")]
    else:  # left running: the next worker finds its pid dead
        assert [(t.number, t.state.name) for t in _study_trials(storage)] == [(0, "RUNNING")]
    again = cli_in_process("search", *args, cwd=tmp_path, cache=shapes_cache)
    assert again.returncode == 0, again.stdout + again.stderr
    trials = _study_trials(storage)
    assert [(t.number, t.state.name, t.user_attrs[trial_workers.STATUS_ATTR]) for t in trials] == \
        [(0, "FAIL", "lost"), (1, "COMPLETE", "ok")]
    assert trials[1].user_attrs[trial_workers.RETRY_ATTR] == 0
    if sig == signal.SIGKILL:
        assert "trial 0: its worker is gone; enqueued to run again" in again.stdout
    assert "study 'peft_search': 1 complete, 0 pruned, 0 failed (1 run by this worker)" in again.stdout
    assert "trials finished" not in again.stdout  # the total was reached
    folder = _study_folder(tmp_path)
    first = json.loads((folder / "0-vitdet_tiny-heads/results.json").read_text())
    assert first["status"] == ("interrupted" if sig == signal.SIGTERM else "failed")
    record = json.loads((folder / "1-vitdet_tiny-heads/results.json").read_text())
    assert record["status"] == "ok" and trials[1].values[0] == pytest.approx(100 * record["params"]["ratio"])
    summary = json.loads((folder / "search.json").read_text())
    assert summary["best_trials"] == [1] and [t["status"] for t in summary["trials"]] == ["lost", "ok"]
    # and once more: the study is full, nothing runs, nothing is enqueued
    full = cli_in_process("search", *args, cwd=tmp_path, cache=shapes_cache)
    assert full.returncode == 0 and "(0 run by this worker)" in full.stdout and len(_study_trials(storage)) == 2


def test_two_concurrent_workers_fill_one_study_without_duplicates(tmp_path, shapes_cache):
    storage = str(tmp_path / "journal.log")  # Optuna's journal file: the other kind of storage
    args = (*STORAGE_TEST, f"search.storage={storage}")
    workers = [_cli(tmp_path, shapes_cache, *args) for _ in range(2)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    storage_obj = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))
    trials = _check_complete_study(tmp_path, storage_obj, 4)
    assert [t.number for t in trials] == [0, 1, 2, 3]  # not one trial past the budget
    ran = [int(out.split(" run by this worker")[0].rsplit("(", 1)[1]) for out in outs]
    assert sum(ran) == 4  # each trial ran in exactly one worker
    numbers = [int(line.split(":")[0].split()[1]) for out in outs for line in out.splitlines()
               if line.startswith("trial ") and " ok: " in line]
    assert sorted(numbers) == [0, 1, 2, 3]
