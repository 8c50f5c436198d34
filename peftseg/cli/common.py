"""What every subcommand shares: the consoles, the error paragraph, --help detection, the
one parser of `key=value` command arguments (eval, merge, predict, visualize), and how a
long command shows its progress (Stages, ItemProgress).

Progress goes to stderr (err_console): stdout keeps what a command found or wrote, so it
can be piped or kept as a log of results.
"""

from __future__ import annotations

import logging
import math
import sys
import time

from rich.console import Console

from peftseg.errors import UserError

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


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Stages:
    """The steps of a long command, each said as it starts.

    On a terminal: a spinner beside the step and its elapsed time; a finished step stays on
    screen with a tick and the time it took. Elsewhere (a file, a pipe, a CI log), where a
    spinner would print nothing: one plain line per step, `<command>: <step>`.

        with Stages(err_console, "export") as stage:
            stage("loading model_final.safetensors")
            ...
            stage("tracing the model")
    """

    def __init__(self, console: Console, command: str):
        self.console, self.command = console, command
        self._progress = None
        self._task = None

    def __enter__(self) -> "Stages":
        if self.console.is_terminal:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(finished_text="[green]✓"), TextColumn(f"[bold]{self.command}"),
                                      TextColumn("{task.description}", markup=False), TimeElapsedColumn(),
                                      console=self.console, transient=False)
            self._progress.start()
        return self

    def __call__(self, text: str) -> None:
        if self._progress is None:
            self.console.print(f"{self.command}: {text}", markup=False, highlight=False, soft_wrap=True)
            return
        self._finish()
        self._task = self._progress.add_task(text, total=1)

    def _finish(self) -> None:
        if self._task is not None:
            self._progress.update(self._task, completed=1)
            self._task = None

    def __exit__(self, exc_type, *_) -> None:
        if self._progress is not None:
            if exc_type is None:  # a step that failed keeps its spinner frozen: the error says why
                self._finish()
            self._progress.stop()


class ItemProgress:
    """A bar over the items of a long command (predict's images): on a terminal rich's bar
    with the current item's name; elsewhere one line per tenth of the items (and at least
    one every `every_s` seconds), `<command>: 40/400 images (name), elapsed 0:00:12, ETA 0:01:48`."""

    def __init__(self, console: Console, command: str, total: int, noun: str = "images", every_s: float = 30.0):
        self.console, self.command, self.total, self.noun, self.every_s = console, command, total, noun, every_s
        self._bar = None
        self._done, self._name = 0, ""
        self._step = max(1, math.ceil(total / 10))

    def __enter__(self) -> "ItemProgress":
        self._start = self._last = time.perf_counter()
        self._last_done = 0
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn(f"[bold]{self.command}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[name]}", markup=False), TimeRemainingColumn(),
                                 console=self.console)
            self._bar.start()
            self._task = self._bar.add_task(self.command, total=self.total, name="")
        return self

    def start(self, name: str) -> None:
        """The item now in work (shown beside the bar)."""
        if self._bar is not None:
            self._bar.update(self._task, name=name)
        self._name = name

    def advance(self) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.advance(self._task)
            return
        now = time.perf_counter()
        if self._done - self._last_done >= self._step or now - self._last >= self.every_s or self._done == self.total:
            elapsed = now - self._start
            eta = elapsed / self._done * (self.total - self._done)
            self.console.print(f"{self.command}: {self._done}/{self.total} {self.noun} ({self._name}), elapsed "
                               f"{_clock(elapsed)}, ETA {_clock(eta)}", markup=False, highlight=False, soft_wrap=True)
            self._last, self._last_done = now, self._done

    def __exit__(self, *_) -> None:
        if self._bar is not None:
            self._bar.stop()
