"""The software a number was made with: the installed versions of the libraries that decide
a model's outputs, and whether the environment is exactly the committed lock.

`scripts/setup.sh` installs `requirements/setup.lock` (exact versions, sha256-checked); a run
records `versions()` (the lock's hash among them) in its results.json and its checkpoints, and
the commands that load a checkpoint say when today's libraries differ from the recorded ones.
"""

from __future__ import annotations

import hashlib
import platform
import re
import sysconfig
from importlib.metadata import PackageNotFoundError, distributions, version
from pathlib import Path

# the libraries whose version can change what a checkpoint computes
VERSIONED = ("torch", "torchvision", "detectron2", "peft", "transformers", "timm", "hydra-core", "peftseg")
# a difference in these is worth a warning when a checkpoint is loaded (the ones that compute)
COMPARED = ("torch", "peft", "transformers", "detectron2")

LOCK_FILE = Path(__file__).resolve().parent.parent / "requirements" / "setup.lock"
# installed by setup.sh beside the lock: pip itself, the rebuilt detectron2, peftseg (editable)
NOT_LOCKED = frozenset({"pip", "detectron2", "peftseg"})

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;([^\\]*))?", re.M)


def canonical(name: str) -> str:
    """PEP 503's normal form of a distribution name (Foo_Bar and foo-bar are one package)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock: str | Path = LOCK_FILE) -> dict[str, str]:
    """{package: version} of every entry of `lock` whose environment marker holds here."""
    from packaging.markers import Marker

    out = {}
    for name, pinned, marker in _PIN.findall(Path(lock).read_text()):
        if marker.strip() and not Marker(marker.strip()).evaluate():
            continue
        out[canonical(name)] = pinned
    return out


def installed_versions() -> dict[str, str]:
    """What this environment installed: the distributions in its own site-packages. Not whatever
    else is on sys.path: a library may put its vendored packages there while a process runs
    (building peft's BOFT CUDA extension adds setuptools' _vendor, with older packaging, zipp, …),
    which would make the lock look modified for every later run of that process."""
    paths = sorted({sysconfig.get_paths()[key] for key in ("purelib", "platlib")})
    return {canonical(d.metadata["Name"]): d.version for d in distributions(path=paths) if d.metadata["Name"]}


def _not_locked(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    return sorted(n for n in installed if n not in locked and n not in NOT_LOCKED)


def installed_not_in_lock(lock: str | Path = LOCK_FILE) -> list[str]:
    return _not_locked(locked_versions(lock), installed_versions())


def lock_differences(lock: str | Path = LOCK_FILE) -> list[str]:
    """How this environment differs from `lock`: 'name: locked X, installed Y' lines."""
    locked, installed = locked_versions(lock), installed_versions()
    out = [f"{n}: locked {v}, installed {installed.get(n, 'nothing')}"
           for n, v in sorted(locked.items()) if installed.get(n) != v]
    out += [f"{n}: not locked, installed {installed[n]}" for n in _not_locked(locked, installed)]
    return out


def lock_state(lock: str | Path = LOCK_FILE) -> str:
    """The lock's sha256 (16 hex digits) when the environment is exactly that lock; with
    '+modified' when it is not; 'none' outside a checkout (a plain `pip install peftseg`)."""
    path = Path(lock)
    if not path.is_file():
        return "none"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return digest if not lock_differences(path) else f"{digest}+modified"


def versions() -> dict[str, str]:
    """python, the installed version of every library a number here depends on, and the lock."""
    out = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist.removesuffix("-core")] = version(dist)
        except PackageNotFoundError:
            out[dist.removesuffix("-core")] = "not installed"
    out["lock"] = lock_state()
    return out


def version_drift(recorded: dict | None) -> str | None:
    """One line naming the libraries whose version differs from `recorded` (a checkpoint's
    versions), or None when they agree (or nothing was recorded)."""
    if not isinstance(recorded, dict):
        return None
    now = versions()
    moved = [f"{name} {recorded[name]} -> {now[name]}" for name in COMPARED
             if isinstance(recorded.get(name), str) and recorded[name] != now.get(name)]
    return ", ".join(moved) or None
