"""What every subcommand shares: the consoles, the error paragraph, --help detection, and the
one parser of `key=value` command arguments (eval, merge, predict, visualize)."""

from __future__ import annotations

from rich.console import Console

from peftseg.errors import UserError

import logging
import sys

# Written to a file or pipe, rich would wrap every line at 80 columns (it cannot know a width),
# cutting detectron2's per-category tables and the record's path: there, text is never wrapped.
console = Console(soft_wrap=not sys.stdout.isatty())
err_console = Console(stderr=True, soft_wrap=not sys.stderr.isatty())


def console_log_handler(level: str | int = "INFO") -> logging.Handler:
    """The console log handler of conf/hydra/job_logging/rich.yaml: rich's (it prints above the
    progress bar) on a terminal; plain lines, unwrapped, when the output is a file or pipe."""
    if sys.stdout.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False)
    else:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    handler.setLevel(level)
    return handler


def report_error(exc: UserError) -> None:
    from rich.markup import escape

    # escaped: messages quote values such as method.sites=[attn,mlp], which rich would eat
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def print_text(text: str) -> None:
    """Plain text (usage lines hold [optional] parts, which are not rich markup)."""
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def split_args(argv: list[str], command: str, own: tuple[str, ...], *, required: tuple[str, ...] = (),
               overrides: bool = True, positional: int = 0, example: str = "") -> tuple[dict[str, str], list[str], list[str]]:
    """(the command's own options, Hydra-style config overrides, positional arguments).

    `own` keys are the command's options (checkpoint=, output=, n=…); any other key=value is
    an override of the model's config when `overrides` is true, else refused. `required`
    options must be present; exactly `positional` bare arguments are accepted."""
    options: dict[str, str] = {}
    rest: list[str] = []
    bare: list[str] = []
    usage = f"see `peftseg {command} --help`" + (f", e.g. peftseg {command} {example}" if example else "")
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            if len(bare) >= positional:
                raise UserError(f"argument {arg!r} is not key=value; {usage}.")
            bare.append(arg)
        elif key in own:
            if key in options:
                raise UserError(f"{key}= is given twice ({options[key]!r} and {value!r}); give it once.")
            options[key] = value
        elif overrides:
            rest.append(arg)
        else:
            raise UserError(f"{key} is not an option of `peftseg {command}`; its options are "
                            f"{', '.join(k + '=' for k in own)} ({usage}).")
    if len(bare) != positional:
        raise UserError(f"`peftseg {command}` takes {positional} bare argument(s), got {len(bare)}; {usage}.")
    for key in required:
        if key not in options:
            raise UserError(f"no {key} given; `peftseg {command}` needs {key}=… ({usage}).")
    return options, rest, bare
