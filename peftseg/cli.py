"""`peftseg` entry point: subcommands over a Hydra app."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

# Third-party deprecation chatter (torch.jit, pkg_resources) would drown the progress bar.
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*pkg_resources.*")

from rich.console import Console  # noqa: E402

from peftseg.config import CONF_DIR  # noqa: E402
from peftseg.errors import UserError  # noqa: E402

GROUPS = ("model", "method", "dataset", "train")
console = Console()
err_console = Console(stderr=True)
log = logging.getLogger("peftseg")

HELP = """\
usage: peftseg <command> [args]

commands:
  train    train + evaluate one run, or a sweep with -m (Hydra overrides: method=lora model=vitdet_b ...)
  search   an Optuna study over methods and their knobs, kept in a storage (resumable, many workers):
           [search.storage=sqlite:///search.db] [search.n_trials=20] [objective=…] [Hydra overrides…]
  eval     evaluate a trained run again: checkpoint=<run dir or model_* file> [dataset=… dataset.*=… train.device=…]
  merge    fold a mergeable method (LoRA family) into the base weights, write a plain detectron2 checkpoint:
           checkpoint=<run dir or model_* file> [output=<file .safetensors or .pth>]
  report   table, report.csv, report.md, pareto.png and training curves of every results.json under a
           directory (a sweep)
  predict  masks on new images: checkpoint=<run dir or model file> input=<image, folder or glob> output=<dir>
           [score_thresh=0.5] [max_size=<px>]; a plain checkpoint also needs model=<preset> classes=[a,b]
  visualize  ground truth | predictions side by side for n validation images of a run: <run dir> [n=8]
  list     the models, methods and datasets there are, one line each

`peftseg <command> --help` tells more; `peftseg train --help` lists the config groups and their options.
"""


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_group_choices(overrides: list[str]) -> None:
    """Name the available options for an unknown model/method/dataset/train before Hydra
    starts (Hydra's own message is a traceback-like block). Sweep syntax is understood:
    each element of `a,b` and `choice(a,b)` is checked; `glob(...)` must match something."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob, ValueType
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except OverrideParseException as e:
            raise UserError(f"cannot read the override {arg!r}: {e}") from None
        group = override.key_or_group
        if group not in GROUPS or override.is_delete():
            continue
        options = group_options(group)
        value = override.value()
        if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
            assert isinstance(value, Glob)
            if not value.filter(options):
                raise UserError(
                    f"{arg!r} matches no {group} option; available {group} options: {', '.join(options)}."
                )
            continue
        choices = list(override.sweep_iterator()) if override.is_sweep_override() else [value]
        for choice in choices:
            if choice not in options:
                raise UserError(
                    f"Unknown {group} {choice!r}. Available {group} options: {', '.join(options)}. "
                    f"Pick one with `{group}=<name>` (the configs live in {CONF_DIR / group}/)."
                )


def report_error(exc: UserError) -> None:
    from rich.markup import escape

    # escaped: messages quote values such as method.sites=[attn,mlp], which rich would eat
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)


def _train_task(cfg):
    """One run; returns its `objective` value(s) for sweepers (None: failed, a failed trial)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from peftseg.config import validate
    from peftseg.objectives import objective_names, objective_values
    from peftseg.results import failed_record, write_record

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    run_id = str(run_dir.relative_to(Path.cwd())) if run_dir.is_relative_to(Path.cwd()) else str(run_dir)
    try:
        validate(cfg)  # ranges, choices, unknown keys: before any heavy import
        objective_names(cfg.objective)  # a typo fails now, not after training
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
    from peftseg.summary import run_table

    # Spawned training processes get the job's logging (console + run dir log file) from here.
    log_config = OmegaConf.to_container(hc.job_logging, resolve=True) if hc.job_logging else None
    try:
        record = launch_run(cfg, run_dir, run_id, log_config)
    except RunInterrupted as stop:
        if stop.checkpoint:
            err_console.print(f"[bold yellow]interrupted:[/] {stop}; checkpoint {run_dir / stop.checkpoint}. "
                              f"Continue with: peftseg train <same overrides> train.resume={run_dir}",
                              soft_wrap=True, highlight=False)
        else:
            err_console.print(f"[bold yellow]interrupted:[/] {stop} (before training had a step to save)",
                              highlight=False)
        sys.exit(128 + stop.signum)  # the shell's convention for "ended by signal N"; stops a sweep too
    except Exception as exc:
        if isinstance(exc, UserError):
            report_error(exc)
        else:
            log.exception("run %s failed", run_id)
        if hc.mode == RunMode.RUN:
            sys.exit(2 if isinstance(exc, UserError) else 1)
        return None
    if record is None:
        console.print(f"machine {cfg.train.machine_rank} done; machine 0 writes the record")
        return None
    console.print(run_table(record))
    console.print(f"record: {run_dir / 'results.json'}")
    return objective_values(record, OmegaConf.to_container(cfg, resolve=True)["objective"])


def train(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):  # ours, not Hydra's: knobs, no schema/* groups
        from peftseg.helptext import train_help

        console.print(train_help(argv), highlight=False, markup=False, soft_wrap=True)
        return 0
    check_group_choices(argv)  # before the heavy imports: a typo fails in a second, not six

    import hydra

    from peftseg.config import register_schemas
    from peftseg.sweep import last_sweep

    register_schemas()
    # Under `python -m peftseg.cli` this module is __main__, whose functions cloudpickle
    # (submitit launchers) copies by value, consoles and all; by module name it pickles a reference.
    from peftseg.cli import _train_task as task

    app = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task)
    sys.argv = ["peftseg train", *argv]
    app()
    outcome = last_sweep()
    if outcome is None:
        return 0  # a single run: failures already exited from inside the task
    sweep_dir, members, failed = outcome
    if members == 0:
        console.print(f"sweep: no run left a record under {sweep_dir}; see the launcher's logs there")
        return 1
    console.print(f"sweep: {failed} of {members} runs failed; records under {sweep_dir}")
    return 1 if failed else 0


def report(argv: list[str]) -> int:
    from peftseg.report import main as report_main

    return report_main(argv)


EVAL_HELP = """\
usage: peftseg eval checkpoint=<run dir, model_* file or merged file> [output=<dir>] [overrides…]

Rebuilds the run's model and method from the checkpoint, loads the trained tensors and
evaluates them. A PEFT checkpoint and a `peftseg merge` file carry their model, method and
classes; a plain detectron2 checkpoint needs model=<preset> and dataset=… (its classes).
The model and method come from the checkpoint; these may be overridden with Hydra's
syntax, as for `peftseg train`:
  dataset=<{datasets}> and dataset.<key>=…   evaluate on other data (same classes)
  train.device=…  train.num_workers=…
Writes <output>/eval.json (default: eval_<checkpoint name>/ beside the checkpoint).
"""

MERGE_HELP = """\
usage: peftseg merge checkpoint=<run dir or model_* file> [output=<file>] [train.device=…]

Folds the method into the base weights (mergeable methods: {mergeable}) and writes the plain
model's tensors (default: model_merged.safetensors beside the checkpoint; an output ending in
.pth gets detectron2's checkpoint layout), loadable with model.weights=<file>.
"""


def _wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def evaluate_checkpoint(argv: list[str]) -> int:
    """`peftseg eval`: rebuild base + method, load the checkpoint, run the dataset's evaluator."""
    if _wants_help(argv):
        from peftseg.registry import DATASETS

        console.print(EVAL_HELP.format(datasets="|".join(DATASETS.names())), highlight=False, markup=False, soft_wrap=True)
        return 0
    from peftseg.engine.evaluate import evaluate
    from peftseg.engine.loading import load_model
    from peftseg.engine.restore import split_command_args
    from peftseg.engine.run import resolve_device
    from peftseg.params import count_parameters
    from peftseg.results import evaluator_metrics, write_json
    from peftseg.summary import eval_table

    options, overrides = split_command_args(argv, ("checkpoint", "output"))
    r = load_model(options["checkpoint"], overrides, need_dataset=True)
    device = resolve_device(r.cfg.train.device)
    r.model.to(device)
    out_dir = Path(options.get("output") or r.source.parent / f"eval_{r.source.stem}")
    results = evaluate(r.model, r.splits.val, r.cfg.model.image_size, out_dir, r.cfg.train.num_workers)
    record = {
        "checkpoint": str(r.source), "checkpoint_kind": r.kind, "dataset": r.cfg.dataset.name,
        "params": count_parameters(r.model).to_dict(), "metrics": evaluator_metrics(results),
    }
    write_json(out_dir / "eval.json", record)
    console.print(eval_table(record))
    console.print(f"record: {out_dir / 'eval.json'}")
    return 0


def merge(argv: list[str]) -> int:
    """`peftseg merge`: fold the method into the base, save a plain detectron2 checkpoint."""
    if _wants_help(argv):
        from peftseg.registry import METHODS

        mergeable = ", ".join(m.name for m in METHODS if m.mergeable)
        console.print(MERGE_HELP.format(mergeable=mergeable), highlight=False, markup=False, soft_wrap=True)
        return 0
    import torch

    from peftseg.engine.export import safetensors_bytes
    from peftseg.engine.loading import MERGED_KEY, merged_metadata
    from peftseg.engine.restore import restore, split_command_args
    from peftseg.methods._merge import merge_and_unload
    from peftseg.results import write_atomic_with
    from peftseg.summary import fmt_bytes

    options, overrides = split_command_args(argv, ("checkpoint", "output"))
    r = restore(options["checkpoint"], overrides)
    model = merge_and_unload(r.model.eval())
    out = Path(options.get("output") or r.source.parent / "model_merged.safetensors")
    # plain tensors under the model's names: loadable with model.weights=<out>; the metadata
    # (config, class names) lets `peftseg eval`/`predict` rebuild the model without overrides.
    # A .pth output keeps detectron2's checkpoint layout ({"model": state dict}).
    meta = merged_metadata(r.cfg, r.splits.class_names, r.source)
    if out.suffix == ".pth":
        write_atomic_with(out, lambda f: torch.save({"model": model.state_dict(), MERGED_KEY: meta}, f))
    else:
        payload = safetensors_bytes(model.state_dict(), {MERGED_KEY: json.dumps(meta), "format": "pt"})
        write_atomic_with(out, lambda f: f.write(payload))
    console.print(f"merged {r.cfg.method.name} into {r.cfg.model.name}: {out} ({fmt_bytes(out.stat().st_size)})")
    return 0


# --- predict / visualize / list (issue 13): thin entry points, the work is in their modules ---
def predict(argv: list[str]) -> int:
    from peftseg.predict import main as predict_main

    return predict_main(argv, console)


def visualize(argv: list[str]) -> int:
    from peftseg.visualize import main as visualize_main

    return visualize_main(argv, console)


def list_options(argv: list[str]) -> int:
    from peftseg.helptext import list_text

    console.print(list_text(), highlight=False, markup=False, soft_wrap=True)
    return 0


def search(argv: list[str]) -> int:
    from peftseg.search import main as search_main

    return search_main(argv, console)


COMMANDS = {"train": train, "search": search, "eval": evaluate_checkpoint, "merge": merge, "report": report,
            "predict": predict, "visualize": visualize, "list": list_options}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        console.print(HELP, highlight=False, markup=False, soft_wrap=True)  # [optional] args are not markup
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        err_console.print(f"[bold red]error:[/] unknown command {command!r}; commands: {', '.join(COMMANDS)}. "
                          "Run `peftseg --help`.", highlight=False)
        return 2
    try:
        return COMMANDS[command](rest)
    except UserError as exc:
        report_error(exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
