"""`peftseg train`: one run, or a sweep with -m, through Hydra's app (conf/)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from peftseg.cli.common import console, err_console, print_text, report_error
from peftseg.config import CONF_DIR, check_group_choices, check_overrides
from peftseg.errors import UserError

log = logging.getLogger("peftseg")


def train_task(cfg):
    """One run; returns its `objective` value(s) for sweepers (None: failed, a failed trial)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from peftseg.config import validate
    from peftseg.experiments.objectives import objective_names, objective_values
    from peftseg import known_warnings
    from peftseg.results import failed_record, write_record

    known_warnings.install()  # again: a launcher may run this task in a process of its own
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    run_id = str(run_dir.relative_to(Path.cwd())) if run_dir.is_relative_to(Path.cwd()) else str(run_dir)
    try:
        validate(cfg)  # ranges, choices, unknown keys: before any heavy import
        objective_names(cfg.objective)  # a typo fails now, not after training
        _continue_own_run(cfg, run_dir)
        if cfg.train.resume:
            cfg = _resumed(cfg, hc, run_dir)
    except UserError as exc:
        report_error(exc)
        if hc.mode == RunMode.RUN:
            sys.exit(2)  # nothing written: the dir may hold (or be in use by) another run
        # a sweep member with a bad value still leaves a record in its own fresh dir, so the
        # sweep's failure count includes it
        write_record(run_dir, failed_record(cfg, run_dir, run_id, exc))
        return None

    from peftseg.engine.distributed import launch_run
    from peftseg.engine.interrupt import RunInterrupted
    from peftseg.engine.requeue import hand_over, ignore_late_warnings
    from peftseg.report.tables import run_table

    # Spawned training processes get the job's logging (console + run dir log file) from here.
    log_config = OmegaConf.to_container(hc.job_logging, resolve=True) if hc.job_logging else None
    try:
        record = launch_run(cfg, run_dir, run_id, log_config)
    except RunInterrupted as stop:
        if stop.elsewhere:
            err_console.print(f"[bold yellow]interrupted:[/] {stop}; the processes of this machine stopped with "
                              f"the others, and machine 0 saved the checkpoint: its record {run_dir / 'results.json'} "
                              "says how to continue", soft_wrap=True, highlight=False)
        elif stop.checkpoint and stop.checkpoint.startswith("model_final"):
            err_console.print(f"[bold yellow]interrupted:[/] {stop}, during the final evaluation; training is "
                              f"complete ({run_dir / stop.checkpoint}). Evaluate it with: peftseg eval "
                              f"checkpoint={run_dir}", soft_wrap=True, highlight=False)
        elif stop.checkpoint:
            err_console.print(f"[bold yellow]interrupted:[/] {stop}; checkpoint {run_dir / stop.checkpoint}. "
                              f"Continue with: peftseg train train.resume={run_dir}",
                              soft_wrap=True, highlight=False)
        else:
            err_console.print(f"[bold yellow]interrupted:[/] {stop} (before training had a step to save)",
                              highlight=False)
        # a submitit job on the scheduler's warning: requeued to resume here (exits), else returns
        hand_over(stop, lambda line: err_console.print(line, soft_wrap=True, highlight=False, markup=False))
        sys.exit(128 + stop.signum)  # the shell's convention for "ended by signal N"; stops a sweep too
    except Exception as exc:
        ignore_late_warnings()
        if isinstance(exc, UserError):
            report_error(exc)
        else:
            log.exception("run %s failed", run_id)
        if hc.mode == RunMode.RUN:
            sys.exit(2 if isinstance(exc, UserError) else 1)
        return None
    ignore_late_warnings()
    if record is None:
        console.print(f"machine {cfg.train.machine_rank} done; machine 0 writes the record")
        return None
    console.print(run_table(record))
    console.print(f"record: {run_dir / 'results.json'}")
    return objective_values(record, OmegaConf.to_container(cfg, resolve=True)["objective"])


def _continue_own_run(cfg, run_dir: Path) -> None:
    """A job the scheduler started again (a requeued SLURM job, a submitit member) whose run dir
    holds its own run, same config, interrupted or killed after a periodic checkpoint,
    continues it: train.resume=<run dir>."""
    from peftseg.engine.requeue import continues_own_run

    what = continues_own_run(cfg, run_dir)
    if what is None:
        return
    log.warning("run dir %s holds this run, %s: this requeued job continues it (train.resume=%s)", run_dir, what,
                run_dir)
    cfg.train.resume = str(run_dir)


def _resumed(cfg, hc, run_dir: Path):
    """The interrupted run's own config with the settings given anew (peftseg.checkpoint.resume),
    also written over the `.hydra/config.yaml` Hydra saved from the command line alone, so
    that the run dir says what runs."""
    from omegaconf import OmegaConf

    from peftseg.checkpoint.resume import resumed_config
    from peftseg.io.atomic import write_atomic

    cfg = resumed_config(cfg, list(hc.overrides.task))
    if hc.output_subdir:
        saved = run_dir / str(hc.output_subdir) / "config.yaml"
        if saved.parent.is_dir():
            write_atomic(saved, OmegaConf.to_yaml(cfg).encode())
    return cfg


def with_resumed_groups(argv: list[str]) -> list[str]:
    """With `train.resume=`, the checkpoint's group choices (model=…, method=…, …) go first,
    unless given: Hydra then names the run dir after the model and method that run."""
    resume = next((a.split("=", 1)[1].strip("'\"") for a in argv if a.startswith("train.resume=")), "")
    if not resume:
        return argv
    from peftseg.checkpoint.resume import saved_group_choices

    given = {a.split("=", 1)[0].lstrip("+~") for a in argv if "=" in a}
    return [*(c for c in saved_group_choices(resume) if c.split("=", 1)[0] not in given), *argv]


def sweep_dir_of(argv: list[str]) -> str:
    """The folder a sweep of `argv` writes to (hydra.sweep.dir, named by the time it starts),
    resolved once here so that this command and Hydra mean the same folder."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from peftseg.config import compose_config

    parser = OverridesParser.create()
    fixed = [a for a in argv if not a.startswith("-") and not parser.parse_overrides([a])[0].is_sweep_override()]
    return str(OmegaConf.select(compose_config(fixed, return_hydra_config=True), "hydra.sweep.dir"))


def with_sweep_dir(argv: list[str], sweep_dir: str) -> list[str]:
    """`argv` with hydra.sweep.dir set to `sweep_dir` (quoted for Hydra's override grammar)."""
    quoted = sweep_dir.replace("\\", "\\\\").replace("'", "\\'")
    return [a for a in argv if not a.startswith("hydra.sweep.dir=")] + [f"hydra.sweep.dir='{quoted}'"]


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):  # ours, not Hydra's: knobs, no schema/* groups
        from peftseg.cli.list import train_help

        print_text(train_help(argv))
        return 0
    check_group_choices(argv)  # before the heavy imports: a typo fails in a second, not six
    argv = with_resumed_groups(argv)
    check_overrides(argv)  # Hydra's raw errors (unknown key, wrong type) as one paragraph

    import hydra

    from peftseg.config import register_schemas
    from peftseg.experiments.sweep import sweep_outcome
    from peftseg.results import now

    register_schemas()
    sweep_dir = sweep_dir_of(argv) if any(a in ("-m", "--multirun") for a in argv) else None
    if sweep_dir is not None:
        argv = with_sweep_dir(argv, sweep_dir)
    # Under `python -m peftseg.cli.train` this module is __main__, whose functions cloudpickle
    # (submitit launchers) copies by value, consoles and all; by module name it pickles a reference.
    from peftseg.cli.train import train_task as task

    app = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task)
    sys.argv = ["peftseg train", *argv]
    started = now()
    app()
    if sweep_dir is None:
        return 0  # a single run: failures already exited from inside the task
    members, failed = sweep_outcome(Path(sweep_dir), started)
    if members == 0:
        console.print(f"sweep: no run left a record under {sweep_dir}; see the launcher's logs there")
        return 1
    console.print(f"sweep: {failed} of {members} runs failed; records under {sweep_dir}")
    return 1 if failed else 0
