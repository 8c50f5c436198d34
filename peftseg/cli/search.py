"""`peftseg search`: an Optuna study over methods and their knobs, kept in a storage that the
same command resumes and many workers share (the study itself: peftseg.engine.search)."""

from __future__ import annotations

from pathlib import Path

from peftseg.cli.common import console as default_console, print_text, report_error, wants_help
from peftseg.errors import UserError
from peftseg.engine.search import (AP_OBJECTIVES, HELP, SUMMARY, _finish_tracking, _first_value, _tracker, _work,
                                   open_study, parse_args, study_dir, study_objective, summarize)


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
        compose_config([*plan.fixed, *(_first_value(knob) for knob in plan.sampled)])
    # a list of any length, checked before the study opens; [segm_ap] is the one objective segm_ap
    plan.objective = objective = study_objective(OmegaConf.to_container(base, resolve=True)["objective"])
    opts = plan.options

    def say(line: str) -> None:  # a store another process holds: said at once, with the wait
        console.print(line, highlight=False, markup=False, soft_wrap=True)

    tracker = _tracker(base, say)  # an MLflow store it cannot write: refused before the study is opened
    study = open_study(plan, objective, base.train, say)
    search_dir = study_dir(plan, study)
    import optuna

    pruner = None if isinstance(study.pruner, optuna.pruners.NopPruner) else study.pruner
    pruner_task = AP_OBJECTIVES[objective] if pruner is not None else None
    console.print(f"study {opts.study!r} in {opts.storage}: {opts.n_trials} trials over {', '.join(plan.methods)}; "
                  f"runs under {search_dir}/; pruner {type(pruner).__name__ if pruner else 'none'}",
                  highlight=False, markup=False, soft_wrap=True)
    if pruner is not None and base.train.num_gpus * base.train.num_machines > 1:
        console.print("note: trials train in several processes (train.num_gpus x train.num_machines > 1), whose "
                      "evaluations this process does not see: no trial will be pruned", highlight=False,
                      markup=False, soft_wrap=True)
    grace_s = 3 * opts.heartbeat_s
    from peftseg.engine.interrupt import RunInterrupted

    try:
        ran = _work(study, plan, search_dir, pruner_task, grace_s, tracker, console)
    except (RunInterrupted, KeyboardInterrupt) as stop:
        console.print(f"interrupted ({stop}); the trial in progress was enqueued to run again: the same "
                      "command continues the study", highlight=False, markup=False, soft_wrap=True)
        return 128 + getattr(stop, "signum", 2)
    summary = summarize(study, plan, objective)
    finished = sum(t["state"] in ("complete", "pruned", "fail") and t["status"] != "lost" for t in summary["trials"])
    if tracker is not None and not any(t["state"] in ("running", "waiting") for t in summary["trials"]):
        _finish_tracking(tracker, study, summary)
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
    for number in summary["best_trials"]:
        t = summary["trials"][number]
        console.print(f"  best: trial {number} {t['values']} {t['params']} ({t['run_dir']})", highlight=False,
                      markup=False, soft_wrap=True)
    console.print(f"browse: optuna-dashboard {opts.storage}", highlight=False, markup=False)
    if states.count("complete") or states.count("pruned") or running or states.count("waiting"):
        return 0
    report_error(UserError(no_result_note(summary, opts)))
    return 1


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
