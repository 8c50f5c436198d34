"""Training progress as a detectron2 hook: a rich bar on a terminal, log lines elsewhere.

A rich bar only renders on a terminal; with output going to a file or a CI log it would
print nothing for the whole run, so there the hook writes one plain line (iteration, loss,
lr, ETA) every `log_period` iterations instead.
"""

from __future__ import annotations

import logging
import time

from detectron2.engine import HookBase
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

log = logging.getLogger("peftseg.progress")


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RichProgress(HookBase):
    def __init__(self, console: Console | None = None, log_period: int = 20):
        self._console = console or Console()
        self._lines = not self._console.is_terminal
        self._log_period = max(1, int(log_period))
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self._console,
            transient=False,
        )
        self._task = None

    def before_train(self):
        self._start, self._start_iter = time.perf_counter(), self.trainer.start_iter
        if self._lines:
            return
        self._progress.start()
        self._task = self._progress.add_task(
            "train", total=self.trainer.max_iter, completed=self.trainer.start_iter, loss="-", lr="-"
        )

    def _fields(self) -> dict:
        storage = self.trainer.storage
        fields = {"loss": "-", "lr": "-"}
        if "total_loss" in storage.histories():
            fields["loss"] = f"{storage.history('total_loss').median(10):.3f}"
        if "lr" in storage.histories():
            fields["lr"] = f"{storage.history('lr').latest():.2e}"
        return fields

    def after_step(self):
        done, total = self.trainer.iter + 1, self.trainer.max_iter
        if not self._lines:
            self._progress.update(self._task, completed=done, **self._fields())
            return
        if done % self._log_period and done != total:
            return
        elapsed = time.perf_counter() - self._start
        steps = done - self._start_iter
        eta = elapsed / steps * (total - done) if steps else 0.0
        f = self._fields()
        log.info("train %d/%d  loss %s  lr %s  elapsed %s  ETA %s", done, total, f["loss"], f["lr"],
                 _clock(elapsed), _clock(eta))

    def after_train(self):
        if not self._lines:
            self._progress.stop()
