"""pip's output while setup.sh installs the lock, one numbered line per package.

    pip install ... -r requirements/setup.lock | python scripts/pip_progress.py requirements/setup.lock

pip prints two or three lines per package (Collecting, Downloading or Using cached, Requirement
already satisfied), a few hundred for the lock; quiet (-q), it printed nothing for minutes while
torch and its CUDA libraries downloaded. Here each package is one line, `setup: [k/N] name==version
(size)`, and the install phase is announced; every line this does not recognise (a warning, an
error, anything new in pip) passes through unchanged. Standard library only: it runs before
anything is installed.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator

COLLECTING = re.compile(r"^Collecting (\S+)")
FETCHED = re.compile(r"^\s+(Downloading|Using cached) \S+ \(([^)]+)\)")
SATISFIED = re.compile(r"^Requirement already satisfied: (\S+)")
INSTALLING = re.compile(r"^Installing collected packages: (.*)")
IGNORED = re.compile(r"^Ignoring \S+: markers .* don't match your environment")  # said before any Collecting
# pip's bookkeeping while it replaces a package, and its closing summary: said by the lines above
QUIET = re.compile(r"^\s*(Attempting uninstall|Found existing installation|Uninstalling |Successfully uninstalled|"
                   r"Successfully installed |Saved |Preparing metadata|Obtaining |Building |Created wheel|Stored in )")


def locked_count(lock: str) -> int:
    """The lock's entries, those for other platforms included (pip says which it ignores)."""
    with open(lock) as f:
        return sum(1 for line in f if re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*==", line))


def compact(lines: Iterable[str], total: int, venv: str = ".venv") -> Iterator[str]:
    """The lines to print for pip's `lines` (without newlines)."""
    done = 0
    pending = None  # a package collected, its download line not seen yet

    def numbered(text: str) -> str:
        return f"setup: [{done:>{len(str(total))}}/{total}] {text}"

    for line in lines:
        line = line.rstrip("\n")
        if IGNORED.match(line):  # an entry for another platform or Python: not one to count
            total -= 1
        elif m := COLLECTING.match(line):
            if pending:
                yield numbered(pending)
            done += 1
            pending = m.group(1)
        elif (m := FETCHED.match(line)) and pending:
            how = "downloading" if m.group(1) == "Downloading" else "in pip's cache"
            yield numbered(f"{pending} ({m.group(2)}, {how})")
            pending = None
        elif m := SATISFIED.match(line):
            if pending:
                yield numbered(pending)
                pending = None
            done += 1
            yield numbered(f"{m.group(1)} (already installed)")
        elif m := INSTALLING.match(line):
            if pending:
                yield numbered(pending)
                pending = None
            names = [p.strip() for p in m.group(1).split(",") if p.strip()]
            slow = " (unpacking torch and its CUDA libraries takes a few minutes)" if "torch" in names else ""
            yield f"setup: installing {len(names)} package(s) into {venv}{slow}"
        elif QUIET.match(line) or not line.strip():
            continue
        else:
            if pending:
                yield numbered(pending)
                pending = None
            yield line
    if pending:
        yield numbered(pending)


def main(argv: list[str]) -> None:
    total = locked_count(argv[0])
    venv = argv[1] if len(argv) > 1 else ".venv"
    for out in compact(sys.stdin, total, venv):
        print(out, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
