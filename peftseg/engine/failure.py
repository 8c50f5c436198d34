"""The real cause of a failed run, in words the user can act on.

Some failures surface far from their cause: a full disk shows up as torch's
"PytorchStreamWriter failed writing file … unexpected pos", a diverged model as
detectron2's "Predicted boxes or scores contain Inf/NaN. Training has diverged." with no
iteration. `explain` recognises them (walking the exception's causes) and returns a
UserError naming the cause and the fix; anything else stays as it is.
"""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

from peftseg.errors import UserError

_LOW_SPACE = 64 << 20  # bytes; below this a failed write is a full disk
_TORCH_WRITE = ("PytorchStreamWriter", "unexpected pos", "file write failed")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def _disk_full(run_dir: Path, what: str) -> UserError:
    free = _free_bytes(run_dir)
    free_text = f"{free / 2**20:.0f} MiB free" if free is not None else "free space unknown"
    return UserError(
        f"the disk holding {run_dir} is full ({free_text}) while writing {what}; free some space (old "
        "runs' model_*.pth files, train.checkpoint_period=0 keeps only the final checkpoint) or put runs "
        "on a larger disk with hydra.run.dir=<folder>, then continue with train.resume=<this run dir>."
    )


def explain(exc: BaseException, run_dir: Path) -> UserError | None:
    """A UserError naming the real cause of `exc`, or None when it is not one recognised here."""
    run_dir = Path(run_dir)
    for e in _chain(exc):
        if isinstance(e, UserError):
            return None
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return _disk_full(run_dir, e.filename or "a file")
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return UserError(
                f"permission denied writing {e.filename or run_dir} ({e.strerror}); make the run dir writable "
                "or write runs elsewhere with hydra.run.dir=<a writable folder>."
            )
        if isinstance(e, RuntimeError) and any(s in str(e) for s in _TORCH_WRITE):
            free = _free_bytes(run_dir)
            if free is not None and free < _LOW_SPACE:
                return _disk_full(run_dir, "a checkpoint")
    return None


_NONFINITE = re.compile(r"'([\w/.]+)': (?:np\.float\d+\()?(nan|-?inf)", re.IGNORECASE)

DIVERGED_FIXES = (
    "lower train.base_lr (e.g. by 10x), use more train.warmup_iters, or check the data for degenerate "
    "boxes/masks (`peftseg` validates the dataset at start)"
)


def diverged(exc: FloatingPointError, iteration: int) -> UserError:
    """detectron2's NaN/inf errors, with the iteration and the loss terms that went non-finite."""
    terms = [f"{name}={value}" for name, value in _NONFINITE.findall(str(exc))]
    if terms:
        what = f"the loss became non-finite at iteration {iteration} ({', '.join(terms)})"
    else:  # the proposal generator's check: the previous update already broke the weights
        what = (f"the model's predictions became non-finite at iteration {iteration} (the update of "
                f"iteration {iteration - 1} made the weights NaN/inf)")
    return UserError(f"training diverged: {what}; {DIVERGED_FIXES}.")
