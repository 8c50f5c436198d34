"""`peftseg` entry point: subcommands over a Hydra app."""

from __future__ import annotations

import logging
import re
import sys
import warnings
from pathlib import Path

# Third-party deprecation chatter (torch.jit, pkg_resources) would drown the progress bar.
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*pkg_resources.*")

from rich.console import Console  # noqa: E402

from peftseg.errors import UserError  # noqa: E402

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "method", "dataset", "train")
console = Console()
err_console = Console(stderr=True)
log = logging.getLogger("peftseg")

HELP = """\
usage: peftseg <command> [args]

commands:
  train    train + evaluate one run, or a sweep with -m (Hydra overrides: method=lora model=vitdet_b ...)

`peftseg train --help` lists the config groups and their options.
"""


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


_CHOICE = re.compile(rf"^(?:\+\+|\+)?({'|'.join(GROUPS)})=(.*)$")


def check_group_choices(overrides: list[str]) -> None:
    """Name the available options for an unknown model/method/dataset/train before Hydra starts."""
    for arg in overrides:
        m = _CHOICE.match(arg)
        if not m:
            continue
        group, value = m.groups()
        options = group_options(group)
        for choice in value.split(","):
            if choice not in options:
                raise UserError(
                    f"Unknown {group} {choice!r}. Available {group} options: {', '.join(options)}. "
                    f"Pick one with `{group}=<name>` (the configs live in {CONF_DIR / group}/)."
                )


def report_error(exc: UserError) -> None:
    err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False)


_failures: list[str] = []
_runs: list[str] = []


def _train_task(cfg) -> dict | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from peftseg.engine.run import run
    from peftseg.summary import run_table

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    run_id = str(run_dir.relative_to(Path.cwd())) if run_dir.is_relative_to(Path.cwd()) else str(run_dir)
    _runs.append(run_id)
    try:
        record = run(cfg, run_dir, run_id)
    except Exception as exc:
        _failures.append(run_id)
        if isinstance(exc, UserError):
            report_error(exc)
        else:
            log.exception("run %s failed", run_id)
        if hc.mode == RunMode.RUN:
            sys.exit(2 if isinstance(exc, UserError) else 1)
        return None
    console.print(run_table(record))
    console.print(f"record: {run_dir / 'results.json'}")
    return record


def train(argv: list[str]) -> int:
    import hydra

    from peftseg.config import register_schemas

    check_group_choices(argv)
    register_schemas()
    app = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_train_task)
    sys.argv = ["peftseg train", *argv]
    app()
    if len(_runs) > 1 or _failures:
        console.print(f"{len(_runs) - len(_failures)} of {len(_runs)} runs succeeded, {len(_failures)} failed")
    return 1 if _failures else 0


COMMANDS = {"train": train}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        console.print(HELP, highlight=False)
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
