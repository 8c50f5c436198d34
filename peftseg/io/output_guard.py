"""The one output-path guard (invariant 2: outputs never destroy inputs).

Every command that writes (predict, visualize, merge, eval output=, report) asks this module
where it may write, before it writes anything:

- `output_dir(...)`: a folder to write into: not a file, not a symlink or special file, not
  the input or inside an input folder, not inside a run's own sub-folders (`peft/`, `.hydra/`,
  `eval/`, `tb/`);
- `output_file(...)`: one file: the same, plus not one of a run's own files (`model_*`,
  `results.json`, `metrics.json`, …) and a suffix the command can write (the format follows
  the suffix; any other suffix is refused, never silently written in another format);
- `distinct_names(...)`: one output name per input, distinct even when two inputs share a stem;
- `write_errors(...)`: an OSError while writing becomes a one-line UserError naming the path;
- `replaceable(...)`: an existing file is replaced only when it is the command's own earlier
  output for the same inputs (its record says so), never another output;
- `unwritable(...)`: why a file or folder another library will create cannot be (MLflow's and
  Optuna's stores), before anything runs.

The checks are on resolved paths, so `photos/../photos` or a symlinked parent cannot slip past.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from peftseg.errors import UserError

# a run dir is recognised by these (what `peftseg train` writes first)
RUN_MARKERS = ("results.json", ".hydra")
# a run's own files and folders: resume, eval, visualize and report read them back
RUN_FILES = ("results.json", "metrics.json", "last_checkpoint", ".peftseg.lock", "train.log")
RUN_FILE_PREFIXES = ("model_", "events.out.tfevents")
USER_FILE_PREFIXES = ("model_merged",)  # `peftseg merge`'s default output: the user's, not the run's
# `peftseg export`'s default outputs beside a checkpoint (model_final.onnx and its parity record):
# the user's too; a run never writes these suffixes
USER_FILE_SUFFIXES = (".onnx", ".torchscript.pt", ".parity.json")
RUN_FOLDERS = ("peft", ".hydra", "eval", "tb")


def _label(what: str, path: Path) -> str:
    return f"{what}{path}" if what.endswith("=") else f"{what} {path}"


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _is_run_dir(path: Path) -> bool:
    return any((path / marker).exists() for marker in RUN_MARKERS)


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _not_special(path: Path, what: str) -> None:
    """A symlink, device, pipe or socket at `path` is refused: writing there lands elsewhere."""
    if os.path.islink(path):
        raise UserError(f"{_label(what, path)} is a symbolic link (to {os.path.realpath(path)}); writing through it would "
                        "change the file it points to. Give a path that is not a link.")
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there yet: mkdir/write name the problem
        return
    except OSError as e:
        raise UserError(f"{_label(what, path)} cannot be examined ({e.strerror}); give another path.") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UserError(f"{_label(what, path)} is a device, pipe or socket, not a file or folder; give a path in a "
                        "folder of your own, e.g. output=results/.")


def _run_owned(path: Path) -> tuple[Path, str] | None:
    """(run dir, the owned entry) when `path` is, or is inside, one of a run's own files/folders."""
    for parent in path.parents:
        if not _is_run_dir(parent):
            continue
        first = path.relative_to(parent).parts[0]
        if first.startswith(USER_FILE_PREFIXES) or first.endswith(USER_FILE_SUFFIXES):
            return None
        if first in RUN_FILES or first in RUN_FOLDERS or first.startswith(RUN_FILE_PREFIXES):
            return parent, first
    return None


def _against_inputs(path: Path, inputs: Iterable[Path], what: str) -> None:
    for given in inputs:
        source = _resolved(given)
        if path == source:
            raise UserError(f"{_label(what, path)} is the input itself; writing there would overwrite it. Give an "
                            "output of its own, e.g. output=predictions/.")
        if source.is_dir() and _inside(path, source):
            raise UserError(f"{_label(what, path)} is inside the input folder {source}; outputs there would mix with "
                            "(or overwrite) the inputs. Give a folder outside it, e.g. output=predictions/.")


def _against_run(path: Path, what: str) -> None:
    owned = _run_owned(path)
    if owned:
        run_dir, entry = owned
        raise UserError(f"{_label(what, path)} is the run's own {entry!r} in {run_dir}, which resume, eval, visualize and "
                        "report read back; writing there would destroy it. Give a path outside those, e.g. "
                        f"{run_dir / 'exports'}.")


def output_dir(output: Path | str, inputs: Iterable[Path] = (), what: str = "output") -> Path:
    """The folder `output`, checked, created; a UserError naming the fix if it may not be written."""
    given = Path(output).expanduser()
    _not_special(given, what)
    path = _resolved(given)
    if path.exists() and not path.is_dir():
        raise UserError(f"{_label(what, given)} is a file; this command writes several files, so give a folder "
                        f"(e.g. {given.with_suffix('')}_out/).")
    _against_inputs(path, inputs, what)
    _against_run(path, what)
    with write_errors(path):
        path.mkdir(parents=True, exist_ok=True)
    return given


def output_file(output: Path | str, suffixes: Iterable[str], inputs: Iterable[Path] = (),
                what: str = "output") -> Path:
    """The file `output`, checked: its suffix is one of `suffixes`, it is not an input, a run's own
    file, a folder, a link or a special file, and its folder can be made."""
    given = Path(output).expanduser()
    suffixes = tuple(suffixes)
    if given.suffix.lower() not in suffixes:
        raise UserError(f"{_label(what, given)} ends in {given.suffix or 'no suffix'!r}; the format follows the suffix and "
                        f"this command writes {' or '.join(suffixes)}, so name it e.g. "
                        f"{given.with_suffix(suffixes[0]).name}.")
    _not_special(given, what)
    path = _resolved(given)
    if path.is_dir():
        raise UserError(f"{_label(what, given)} is a folder; give a file name inside it, e.g. "
                        f"{given / ('out' + suffixes[0])}.")
    _against_inputs(path, inputs, what)
    _against_run(path, what)
    with write_errors(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    return given


def check_targets(targets: Iterable[Path], inputs: Iterable[Path], what: str = "output",
                  fix: str = "give an output folder of its own") -> None:
    """Each file a command is about to write: not an input file nor inside an input folder, not a
    run's own, not special. `fix` says what to give instead."""
    sources = {_resolved(p) for p in inputs}
    for target in targets:
        _not_special(target, what)
        path = _resolved(target)
        if path in sources:
            raise UserError(f"{_label(what, target)} would overwrite the input {path}; {fix}.")
        inside = next((s for s in sorted(sources) if s.is_dir() and _inside(path, s)), None)
        if inside is not None:
            raise UserError(f"{_label(what, target)} would be written inside the input folder {inside}, among the "
                            f"files it is read from; {fix}.")
        _against_run(path, what)


def distinct_names(paths: list[Path], suffix: str) -> dict[Path, str]:
    """One output file name per input: `<stem><suffix>`, or — for inputs sharing a stem
    (a.jpg and a.png, or d1/a.jpg and d2/a.jpg) — `<stem>_<ext><suffix>`, numbered if still equal."""
    stems = Counter(p.stem for p in paths)
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for p in paths:
        base = p.stem if stems[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower() or 'noext'}"
        name, n = f"{base}{suffix}", 2
        while name in taken:
            name, n = f"{base}-{n}{suffix}", n + 1
        taken.add(name)
        names[p] = name
    return names


def unwritable(path: Path, kind: str = "file") -> str | None:
    """Why a library that creates `path` (a `kind` "file" or "folder", with any missing parent
    folders) could not, or None. Found by writing a temporary file where it would be created,
    not from permission bits: root ignores those and a read-only mount does not show in them.
    For stores opened by other libraries (MLflow's, Optuna's), checked before anything runs."""
    import tempfile

    path = Path(path).expanduser()
    if kind == "file" and path.is_dir():
        return f"{path} is a folder, not a file"
    if kind == "folder" and path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    folder = path.parent if kind == "file" else path
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return (f"{existing} is a file, not a folder" if existing == folder
                else f"{existing} is a file, so {folder} cannot be created under it")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
        if kind == "file" and path.exists():
            with open(path, "r+b"):
                pass
    except OSError as e:
        return f"{path if kind == 'file' and path.exists() else existing} cannot be written ({e.strerror or e})"
    return None


_FIXES = {
    errno.EACCES: "you may not write there: give a folder you own",
    errno.EPERM: "you may not write there: give a folder you own",
    errno.EROFS: "the file system is read-only: give a folder on a writable disk",
    errno.ENOSPC: "the disk is full: free space or give a folder on another disk",
    errno.EDQUOT: "your disk quota is used up: free space or give a folder on another disk",
    errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path",
    errno.EEXIST: "a part of the path is a file, not a folder: fix the path",  # mkdir over a file
    errno.EISDIR: "it is a folder: give a file name",
    errno.ENAMETOOLONG: "the name is too long: give a shorter path",
}


@contextlib.contextmanager
def write_errors(path: Path) -> Iterator[None]:
    """An OSError in the block (permissions, read-only or full disk) as one line naming `path`."""
    try:
        yield
    except OSError as e:
        fix = _FIXES.get(e.errno, "give another output path")
        where = e.filename or path  # peftseg.io.atomic names the file asked for, never its temporary sibling
        raise UserError(f"could not write {where}: {e.strerror or e}; {fix}.") from None


def replaceable(path: Path, record: Path, owner: dict, what: str = "output=") -> bool:
    """Whether a command may write `path` and `record` (the JSON record it writes beside it) when
    something is already there. False: neither exists. True: they are the command's own earlier
    output for the same inputs, i.e. the record holds every key of `owner` with the same value (the
    caller says so when it replaces them). A UserError naming the difference otherwise: an output
    never replaces a file the command did not write, nor its own output for other inputs."""
    path, record = Path(path), Path(record)
    if not (os.path.lexists(path) or os.path.lexists(record)):
        return False
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError):
        saved = None
    missing = f"there is no readable record {record.name} beside it" if record != path else \
        "it records no inputs it was made from"
    return own_earlier_output(path, saved, owner, f"record {record.name}", missing, what)


def own_earlier_output(path: Path, saved: dict | None, owner: dict, record: str, missing: str,
                       what: str = "output=") -> bool:
    """True when `saved` (what an existing output at `path` records of its making: its record
    file, or a checkpoint's metadata) names the same inputs as `owner`; a UserError otherwise,
    `missing` saying why when it names none, `record` naming where it was read from."""
    if not isinstance(saved, dict) or not set(owner) <= set(saved):
        raise UserError(f"{_label(what, path)} already exists and is not this command's own earlier output ({missing}); "
                        "writing there would replace it. Give another output=, or remove the file yourself if it may go.")
    differ = [k for k in owner if saved.get(k) != owner[k]]
    if differ:
        detail = "; ".join(f"{k} {saved.get(k)!r} there, {owner[k]!r} now" for k in differ)
        raise UserError(f"{_label(what, path)} already exists as this command's output for other inputs (its "
                        f"{record} says {detail}); writing there would replace it. Give another output=, or remove "
                        "the file and its record yourself if they may go.")
    return True
