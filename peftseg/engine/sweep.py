"""The outcome of a Hydra multirun, whichever launcher ran its members.

Members may run in other processes (submitit locally, SLURM jobs), so the sweep's outcome
is read back from the records they leave under the sweep dir, not from this process's
memory. Lives outside cli.py so that `python -m peftseg.cli` (module `__main__`) and the
callback Hydra instantiates by name (`peftseg.engine.sweep.SweepTracker`) share one state.
"""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback

from peftseg.results import FILENAME, now, read_record

_sweep: dict = {}


class SweepTracker(Callback):
    """Hydra callback (conf/config.yaml): notes where and when a multirun starts."""

    def on_multirun_start(self, config, **kwargs) -> None:
        # Same clock and format as the records' run.start_time.
        _sweep.update(dir=Path(str(config.hydra.sweep.dir)), start=now())


def last_sweep() -> tuple[Path, int, int] | None:
    """(sweep dir, members, failed) of the multirun this process ran; None after a single run."""
    if not _sweep:
        return None
    records = [read_record(p) for p in sorted(_sweep["dir"].rglob(FILENAME))]
    # A reused sweep dir may hold older records; theirs started before this sweep did.
    mine = [r for r in records if r.run.start_time >= _sweep["start"]]
    return _sweep["dir"], len(mine), sum(not r.ok for r in mine)
