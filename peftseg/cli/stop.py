"""SIGTERM/SIGINT for every command: stop at once, one line, exit 128+signal, no traceback.

`timeout`, `scancel`, a SLURM time limit and Ctrl-C signal the whole process group. Without
a handler, SIGINT was a KeyboardInterrupt traceback and SIGTERM killed the process wherever
it was. Here the signal raises `Stopped` in the main thread; files are written atomically
(peftseg.io.atomic), so a stopped `eval`, `merge`, `predict` or `visualize` leaves whole files
or none. A training run installs its own handlers for its duration (peftseg.engine.interrupt:
stop at a step boundary with a checkpoint and an `interrupted` record) and puts these back
after. Data-loader workers ignore both signals (peftseg.data.loading.loaders): the main process decides.
"""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """A stop asked for by a signal (BaseException, as KeyboardInterrupt: not an error)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def _raise(signum, frame):
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals():
    if threading.current_thread() is not threading.main_thread():  # only there can Python set handlers
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
