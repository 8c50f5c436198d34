"""A rich progress bar as a detectron2 hook: iteration, loss, lr, ETA."""

from __future__ import annotations

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


class RichProgress(HookBase):
    def __init__(self, console: Console | None = None):
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task = None

    def before_train(self):
        self._progress.start()
        self._task = self._progress.add_task(
            "train", total=self.trainer.max_iter, completed=self.trainer.start_iter, loss="-", lr="-"
        )

    def after_step(self):
        storage = self.trainer.storage
        fields = {}
        if "total_loss" in storage.histories():
            fields["loss"] = f"{storage.history('total_loss').median(10):.3f}"
        if "lr" in storage.histories():
            fields["lr"] = f"{storage.history('lr').latest():.2e}"
        self._progress.update(self._task, completed=self.trainer.iter + 1, **fields)

    def after_train(self):
        self._progress.stop()
