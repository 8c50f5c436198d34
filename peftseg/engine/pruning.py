"""Listeners on the periodic evaluation, and the stop they may ask for: a pruned run.

`peftseg search` prunes trials whose mask AP at a periodic evaluation (train.eval_period)
is poor next to the other trials' (Optuna's pruners decide). The trainer's evaluation hook
calls `evaluated(...)` after every evaluation; a listener registered around the run with
`on_evaluation(...)` reports the number to its Optuna trial and raises `RunPruned` when the
pruner says stop. The run then records `status: "pruned"` with the iteration and the
evaluation's metrics, never "ok".

Listeners live in the process that registered them: a run spread over several processes
(train.num_gpus > 1) trains in children that have none, so it is never pruned.
"""

from __future__ import annotations

import contextlib
from typing import Callable

# listener(iterations done, evaluator results {task: {metric: value}}, final evaluation?)
Listener = Callable[[int, dict, bool], None]
_listeners: list[Listener] = []


class RunPruned(BaseException):
    """A stop asked for by a pruner, not an error. BaseException, as RunInterrupted:
    detectron2's trainer logs every Exception with a traceback, which a prune does not deserve."""

    def __init__(self, iteration: int, results: dict, reason: str):
        self.iteration, self.results, self.reason = iteration, results, reason
        super().__init__(f"pruned after iteration {iteration}: {reason}")


@contextlib.contextmanager
def on_evaluation(listener: Listener):
    """Call `listener` after every evaluation of the runs inside the block."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def evaluated(iteration: int, results: dict, final: bool) -> None:
    """Called by the trainer's evaluation hook; a listener may raise RunPruned."""
    for listener in list(_listeners):
        listener(iteration, results, final)
