"""`peftseg` entry point: one module per subcommand in this package.

Each subcommand module has `main(argv) -> exit status` and is imported only when its
command runs, so `peftseg list` or a bad value never pays for torch or detectron2.
"""

from __future__ import annotations

import importlib
import sys

from peftseg import known_warnings
from peftseg.cli.common import console, err_console, print_text, report_error
from peftseg.errors import UserError, UserErrorExit

__all__ = ["COMMANDS", "console", "err_console", "main"]

# command -> what it does, for `peftseg --help`; each runs peftseg.cli.<command>.main(argv)
COMMANDS = {
    "train": "train + evaluate one run, or a sweep with -m (Hydra overrides: method=lora model=vitdet_b ...)",
    "search": "an Optuna study over methods and their knobs, kept in a storage (resumable, many workers):\n"
              "[search.storage=sqlite:///search.db] [search.n_trials=20] [objective=…] [Hydra overrides…]",
    "eval": "evaluate a trained run again: checkpoint=<run dir or model_* file> [dataset=… dataset.*=… "
            "train.device=…]",
    "merge": "fold a mergeable method (LoRA family) into the base weights, write a plain detectron2 checkpoint:\n"
             "checkpoint=<run dir or model_* file> [output=<file .safetensors or .pth>]",
    "report": "table, report.csv, report.md, pareto.png and training curves of every results.json under a\n"
              "directory (a sweep)",
    "export": "the model as one ONNX, PyTorch 2 (.pt2) or TorchScript file (LoRA folded in), parity with PyTorch checked:\n"
              "checkpoint=<run dir, model_* file or merged file> format=onnx|pt2|torchscript [output=<file>]",
    "predict": "masks on new images: checkpoint=<run dir or model file> input=<image, folder or glob> output=<dir>\n"
               "[score_thresh=0.5] [max_size=<px>]; a plain checkpoint also needs model=<preset> classes=[a,b];\n"
               "checkpoint=[runA,runB,…]: task variants of one base, the base in memory once",
    "visualize": "ground truth | predictions side by side for n validation images of a run: <run dir> [n=8]",
    "list": "the models, methods and datasets there are, one line each",
}


def _help() -> str:
    width = 9  # a longer name gets two spaces after it
    lines = ["usage: peftseg <command> [args]", "", "commands:"]
    for name, text in COMMANDS.items():
        first, *rest = text.split("\n")
        lines.append(f"  {name:<{width}}{first}" if len(name) + 2 <= width else f"  {name}  {first}")
        lines += [f"  {'':<{width}}{line}" for line in rest]
    lines += ["", "`peftseg <command> --help` tells more; `peftseg train --help` lists the config groups and their "
              "options."]
    return "\n".join(lines) + "\n"


HELP = _help()


def main(argv: list[str] | None = None) -> int:
    # third-party warnings nobody can act on, each by its message and module (known_warnings):
    # set by the entry point only, so importing peftseg as a library changes no global filter
    known_warnings.install()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_text(HELP)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        err_console.print(f"[bold red]error:[/] unknown command {command!r}; commands: {', '.join(COMMANDS)}. "
                          "Run `peftseg --help`.", highlight=False)
        return 2
    from peftseg.cli.stop import Stopped, stop_on_signals

    try:
        with stop_on_signals():
            return importlib.import_module(f"peftseg.cli.{command}").main(rest)
    except UserError as exc:
        report_error(exc)
        return 2
    except UserErrorExit as exc:  # a UserError from inside Hydra's callbacks (peftseg.errors)
        report_error(exc.error)
        return 2
    except Stopped as stop:
        err_console.print(f"[bold yellow]interrupted:[/] peftseg {command} {stop}; the files it had finished are "
                          "whole, the one in progress was not written.", soft_wrap=True, highlight=False)
        return 128 + stop.signum  # the shell's convention for "ended by signal N"


if __name__ == "__main__":
    sys.exit(main())
