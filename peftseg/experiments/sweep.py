"""The outcome of a Hydra multirun, whichever launcher ran its members.

Members may run in other processes (submitit locally, SLURM jobs), so the sweep's outcome
is read back from the records they leave under the sweep dir, not from this process's
memory. The caller names the sweep dir and when the sweep started: `peftseg train -m`
resolves the dir before Hydra starts and passes it to Hydra (`hydra.sweep.dir=…`), so both
mean the same folder.
"""

from __future__ import annotations

from pathlib import Path

from peftseg.results import FILENAME, read_record


def sweep_outcome(sweep_dir: Path, since: str) -> tuple[int, int]:
    """(members, failed) of the sweep that started at `since` (a record's run.start_time
    format) in `sweep_dir`. A reused sweep dir may hold older records; theirs started before."""
    records = [read_record(p) for p in sorted(Path(sweep_dir).rglob(FILENAME))]
    mine = [r for r in records if r.run.start_time >= since]
    return len(mine), sum(not r.ok for r in mine)
