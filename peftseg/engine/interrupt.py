"""SIGTERM/SIGINT/SIGUSR1/SIGUSR2: stop at a step boundary, save a resumable checkpoint,
record "interrupted".

Schedulers (SLURM, Kubernetes, most batch systems) send SIGTERM and wait a grace period
before SIGKILL. SLURM's warning before a time limit or a preemption (`sbatch --signal`) is a
user signal: SIGUSR2 under submitit (hydra/launcher=slurm), SIGUSR1 in many hand-written job
scripts. Either one is treated as SIGTERM is (their default action would kill the run
mid-step, without a checkpoint); under the slurm launcher the job then asks to be requeued
(hydra_plugins/peftseg_launcher). During training the first signal only sets a flag; the step in progress
finishes, `StopAtStepBoundary` writes a periodic-style checkpoint (optimizer, scheduler,
iteration, RNG and data position) and raises `RunInterrupted`, and the run records
`status: "interrupted"` with the iteration, so `train.resume=<run dir>` continues it.
A second signal stops at once. Before and after training (model build, evaluation) there is
no step to finish: a signal raises `RunInterrupted` right away, and the record says so.
Evaluations inside training (periodic and final) are such stretches too (`undeferred`):
a signal stops them at once instead of after minutes of inference, and the trainer saves
the state of the step boundary the evaluation started from.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

from detectron2.engine import HookBase
from detectron2.utils import comm

log = logging.getLogger(__name__)

# the stops a run turns into a checkpoint at the next step boundary
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
# the scheduler's warning before a time limit or a preemption: the job may be requeued
WARNINGS = (signal.SIGUSR1, signal.SIGUSR2)


class RunInterrupted(BaseException):
    """A requested stop, not an error. BaseException, as KeyboardInterrupt: detectron2's
    trainer logs every Exception with a traceback, which a stop does not deserve."""

    def __init__(self, signum: int, iteration: int | None = None, checkpoint: str | None = None,
                 agreed: bool = False, elsewhere: bool = False):
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        # agreed: every process of the run stops at this same step boundary (none is left
        # waiting in a collective), so the processes end normally and none is killed while
        # rank 0 still writes the checkpoint
        self.agreed = agreed
        # elsewhere: this machine's processes stopped, machine 0 saved the checkpoint and the record
        self.elsewhere = elsewhere
        where = f" after iteration {iteration}" if iteration is not None else ""
        super().__init__(f"stopped by {signal.Signals(signum).name}{where}")


class StopRequest:
    """Signal handlers for the duration of a run; `deferred` while a training step may be running."""

    def __init__(self):
        self.signum: int | None = None
        self._first = 0.0  # when the pending signal came
        self.deferred = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only there can Python set handlers
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False

    @contextlib.contextmanager
    def undeferred(self):
        """A stretch inside training with no step to finish (an evaluation): a signal pending
        from the step before, or one that comes now, stops it at once."""
        was, self.deferred = self.deferred, False
        try:
            if self.signum is not None:
                raise RunInterrupted(self.signum)
            yield
        finally:
            self.deferred = was

    # a signal can arrive twice at once: from a terminal or `scancel` (sent to every process of
    # the group) and forwarded by the launching process; a repeat this soon is the same request
    REPEAT_WINDOW_S = 2.0

    def _handle(self, signum, frame):
        import time

        now = time.monotonic()
        if self.signum is not None and now - self._first < self.REPEAT_WINDOW_S:
            return
        if self.signum is not None or not self.deferred:
            self.signum = signum
            raise RunInterrupted(signum)
        self.signum, self._first = signum, now
        log.warning("%s received: stopping after the current step with a checkpoint (send it again to stop "
                    "at once, without one)", signal.Signals(signum).name)


class StopAtStepBoundary(HookBase):
    """Last hook of a step: if a stop was asked for (on any rank), save and raise."""

    def __init__(self, request: StopRequest, checkpointer):
        self._request, self._checkpointer = request, checkpointer

    def before_train(self):
        self._request.deferred = True

    def after_train(self):
        self._request.deferred = False

    def after_step(self):
        signum = self._request.signum
        if comm.get_world_size() > 1:  # every rank must stop at the same step, or DDP hangs
            signum = next((s for s in comm.all_gather(signum) if s is not None), None)
        if signum is None:
            return
        it = self.trainer.iter
        if it >= self.trainer.max_iter - 1:
            # the last step: model_final is written (an earlier hook), nothing is left to resume
            from peftseg.checkpoint.files import FINAL

            raise RunInterrupted(signum, it, f"{FINAL}.safetensors", agreed=True)
        name = f"model_{it:07d}"
        self._checkpointer.save(name, iteration=it)
        raise RunInterrupted(signum, it, f"{name}.pth", agreed=True)
