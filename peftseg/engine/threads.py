"""A run's CPU threads: `train.threads`, and one hint when they outnumber the free cores.

Torch starts one compute thread per core. When other processes keep some of those cores busy
(another run, a test suite, a shared CI runner), the threads wait for each other at every
parallel op and each step gets slower than with fewer threads (3.1 s against 0.49 s per
iteration on 2 shared cores: docs/getting-started.md). A CPU run checks once, after its timing
warm-up steps, and says so in one line with the fix.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch
from detectron2.engine import HookBase

log = logging.getLogger(__name__)


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch.set_num_threads(threads) for the body (None: torch's default, untouched); the
    number before is restored after, so runs in one process (a sweep) do not inherit it."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(before)


def oversubscription_hint(*, device_type: str, threads: int, processes: int = 1, cores: int | None,
                          load: float, own_load: float = 0.0, usable: int | None = None) -> str | None:
    """One line naming the fix when a run's torch threads outnumber the cores free for them; None
    when they do not, or when fewer threads would not help (1 thread, a GPU run).

    threads: torch's threads per process; processes: training processes on this machine; cores:
    the machine's (os.cpu_count()); load: its 1-minute load average, own_load: the part of it this
    run makes (its own CPU use), so that `load - own_load` is the other processes'; usable: the
    cores this process may run on (its CPU affinity, e.g. a SLURM allocation)."""
    if device_type != "cpu" or threads <= 1 or not cores:
        return None
    demand = threads * processes
    others = max(0.0, load - own_load)
    free = min(cores - others, usable if usable else cores)
    if demand <= free:
        return None
    per_process = max(1, round(free) // processes)
    if usable and usable < cores - others:
        where = f"only {usable} cores are allotted to it"
    elif round(others) >= cores:
        where = f"other processes already keep all {cores} cores of this machine busy (load average {load:.1f})"
    else:
        where = (f"other processes keep about {others:.0f} of this machine's {cores} cores busy "
                 f"(load average {load:.1f})")
    fix = f"Set train.threads={per_process} (or OMP_NUM_THREADS={per_process} in the environment)"
    if per_process > 1:
        fix += "; with several runs sharing the cores, train.threads=1"
    return (f"this CPU run computes with {threads} torch threads{' per process' if processes > 1 else ''}, but "
            f"{where}: the threads wait for each other and every step is slower. {fix}.")


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class OversubscriptionCheck(HookBase):
    """After the timing warm-up steps of a CPU run, the hint above, at most once per process."""

    said = False  # one line per process, not one per member of an in-process sweep

    def __init__(self, device: torch.device, processes: int, warmup_iters: int):
        self._device, self._processes, self._after = device, processes, max(1, warmup_iters) + 1

    def before_train(self):
        self._start, self._cpu, self._steps = time.perf_counter(), _cpu_seconds(), 0

    def after_step(self):
        self._steps += 1
        if self._steps != self._after or OversubscriptionCheck.said or not hasattr(os, "getloadavg"):
            return
        wall = time.perf_counter() - self._start
        own = (_cpu_seconds() - self._cpu) / wall if wall > 0 else 0.0  # cores this process kept busy
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        hint = oversubscription_hint(device_type=self._device.type, threads=torch.get_num_threads(),
                                     processes=self._processes, cores=os.cpu_count(), load=os.getloadavg()[0],
                                     own_load=own * self._processes, usable=usable)
        if hint:
            OversubscriptionCheck.said = True
            log.warning(hint)
