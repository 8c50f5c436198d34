"""`peftseg search`: an Optuna study over methods and their knobs, kept in a storage that the
same command resumes and many workers share (the study itself: peftseg.experiments.search)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftseg.cli.common import console as default_console, print_text, report_error, wants_help
from peftseg.errors import UserError
from peftseg.experiments.search import (AP_OBJECTIVES, SUMMARY, Plan, SearchOptions, open_study, study_dir,
                                        study_objective, summarize, work)
from peftseg.experiments.search_tracking import finish_tracking, open_tracker

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


def first_value(knob) -> str:
    first = knob.choices[0] if hasattr(knob, "choices") else knob.low
    return f"{knob.key}={knob.override(first)}"



def main(argv: list[str], console=None) -> int:
    """`peftseg search`: run trials of the study until it holds search.n_trials; exit code."""
    console = console or default_console
    if wants_help(argv):
        print_text(HELP)
        return 0
    plan = parse_args(argv)
    from peftseg.config import check_group_choices

    # groups fixed or sampled (model=vitdet_b,swin_t) must exist
    check_group_choices([a for a in argv if not a.startswith("search.") and not a.startswith("method=")])
    from omegaconf import OmegaConf

    from peftseg.config import compose_config, validate
    from peftseg.io.atomic import write_json

    base = compose_config(plan.fixed)  # the fixed part fails now, not in every trial
    validate(base)
    if plan.sampled:  # and so does a sampled key the config does not have
        compose_config([*plan.fixed, *(first_value(knob) for knob in plan.sampled)])
    # a list of any length, checked before the study opens; [segm_ap] is the one objective segm_ap
    plan.objective = objective = study_objective(OmegaConf.to_container(base, resolve=True)["objective"])
    opts = plan.options

    def say(line: str) -> None:  # a store another process holds: said at once, with the wait
        console.print(line, highlight=False, markup=False, soft_wrap=True)

    tracker = open_tracker(base, say)  # an MLflow store it cannot write: refused before the study is opened
    study = open_study(plan, objective, base.train, say)
    search_dir = study_dir(plan, study)
    import optuna

    pruner = None if isinstance(study.pruner, optuna.pruners.NopPruner) else study.pruner
    pruner_task = AP_OBJECTIVES[objective] if pruner is not None else None
    console.print(f"study {opts.study!r} in {opts.storage}: {opts.n_trials} trials over {', '.join(plan.methods)}; "
                  f"runs under {search_dir}/; pruner {type(pruner).__name__ if pruner else 'none'}",
                  highlight=False, markup=False, soft_wrap=True)
    grace_s = 3 * opts.heartbeat_s
    from peftseg.engine.interrupt import RunInterrupted

    try:
        ran = work(study, plan, search_dir, pruner_task, grace_s, tracker, console)
    except (RunInterrupted, KeyboardInterrupt) as stop:
        console.print(f"interrupted ({stop}); the trial in progress was enqueued to run again: the same "
                      "command continues the study", highlight=False, markup=False, soft_wrap=True)
        return 128 + getattr(stop, "signum", 2)
    summary = summarize(study, plan, objective)
    finished = sum(t["state"] in ("complete", "pruned", "fail") and t["status"] != "lost" for t in summary["trials"])
    if tracker is not None and not any(t["state"] in ("running", "waiting") for t in summary["trials"]):
        finish_tracking(tracker, study, summary)
    search_dir.mkdir(parents=True, exist_ok=True)
    write_json(search_dir / SUMMARY, summary)
    states = [t["state"] for t in summary["trials"] if t["status"] != "lost"]
    running = states.count("running")
    console.print(f"study {opts.study!r}: {states.count('complete')} complete, {states.count('pruned')} pruned, "
                  f"{states.count('fail')} failed" + (f", {running} still running in other workers" if running else "")
                  + f" ({ran} run by this worker); {search_dir / SUMMARY}", highlight=False, markup=False, soft_wrap=True)
    if finished < opts.n_trials:  # a search reaches its total, or says why not
        waiting = states.count("waiting")
        why = ([f"{running} still running in other workers"] if running else []) + \
            ([f"{waiting} enqueued to run again (their worker stopped) after this worker finished: run the same "
              "command again"] if waiting else [])
        console.print(f"{finished} of search.n_trials={opts.n_trials} trials finished; {', '.join(why)}",
                      highlight=False, markup=False, soft_wrap=True)
    for line in best_lines(study, plan, summary):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    console.print(f"browse: optuna-dashboard {opts.storage}", highlight=False, markup=False)
    if states.count("complete") or states.count("pruned") or running or states.count("waiting"):
        return 0
    report_error(UserError(no_result_note(summary, opts)))
    return 1


def _shown_override(override: str) -> str:
    """A sampled override with a float value to 4 significant digits (the command keeps it whole)."""
    key, _, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    return f"{key}={number:.4g}" if any(c in value for c in ".eE") else override


def _where(run_dir: str | None) -> str:
    """A run dir as the user can type it from here: relative under the working directory."""
    import os

    if not run_dir:
        return "(no run dir)"
    relative = os.path.relpath(run_dir)
    return run_dir if relative.startswith("..") else relative


def best_lines(study, plan: Plan, summary: dict) -> list[str]:
    """The best trial (or, for several objectives, each trial of the Pareto front): its labelled
    objectives, what it sampled, its run dir, and the `peftseg train` command that trains the
    same configuration (the study's fixed overrides and the trial's sampled ones)."""
    import shlex

    from peftseg.experiments.objectives import objective_names, shown_values
    from peftseg.experiments.trial import trial_overrides

    best = summary["best_trials"]
    if not best:
        return []
    names = objective_names(plan.objective)
    lines = []
    if len(names) > 1:
        goals = " and ".join(f"{n} ({'higher' if d == 'maximize' else 'lower'} is better)"
                             for n, d in zip(names, summary["directions"]))
        lines.append(f"best trials: the {len(best)} on the Pareto front of {goals}")
    trials = study.get_trials(deepcopy=False)
    for number in best:
        frozen = trials[number]
        sampled = trial_overrides(frozen, plan)  # the overrides it ran with, from its stored parameters
        lines += [f"best: trial {number}: {shown_values(plan.objective, frozen.values)}",
                  f"  sampled: {' '.join(_shown_override(o) for o in sampled)}",
                  f"  run dir: {_where(summary['trials'][number]['run_dir'])}",
                  "  train it: peftseg train " + " ".join(shlex.quote(o) for o in [*plan.fixed, *sampled])]
    return lines


def no_result_note(summary: dict, opts) -> str:
    """Every trial of the study failed: the first one's reason, and how to run again (the same
    command would find the budget used and run nothing)."""
    from peftseg.results import read_record

    failed = [t for t in summary["trials"] if t["state"] == "fail" and t["status"] != "lost"]
    reason = "see the trials' records"
    for t in failed:
        try:
            error = read_record(Path(t["run_dir"])).error or {}
        except (OSError, ValueError, TypeError):
            continue
        reason = f"trial {t['number']}: {error.get('type')}: {error.get('message')}"
        break
    return (f"no trial of study {opts.study!r} has a result: all {len(failed)} failed ({reason}). Fix that, then run "
            f"again with a new search.study=<name> or a larger search.n_trials: the failed trials count toward "
            f"search.n_trials={opts.n_trials}, so the same command would run nothing.")
