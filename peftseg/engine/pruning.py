"""The stop a search's pruner may ask for at a periodic evaluation: a pruned run.

`peftseg search` prunes trials whose mask AP at a periodic evaluation (train.eval_period)
is poor next to the other trials' (Optuna's pruners decide). The search passes a listener
to the run (`run(..., on_evaluation=…)`), which the trainer calls after every evaluation;
it reports the number to its Optuna trial and raises `RunPruned` when the pruner says stop.
The run then records `status: "pruned"` with the iteration and the evaluation's metrics,
never "ok".
"""

from __future__ import annotations

from typing import Callable

# listener(iterations done, evaluator results {task: {metric: value}}, final evaluation?)
EvaluationListener = Callable[[int, dict, bool], None]


class RunPruned(BaseException):
    """A stop asked for by a pruner, not an error. BaseException, as RunInterrupted:
    detectron2's trainer logs every Exception with a traceback, which a prune does not deserve."""

    def __init__(self, iteration: int, results: dict, reason: str):
        self.iteration, self.results, self.reason = iteration, results, reason
        super().__init__(f"pruned after iteration {iteration}: {reason}")
