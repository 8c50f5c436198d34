"""The locked environment: scripts/setup.sh installs exactly requirements/setup.lock, the lock
covers what pyproject.toml asks for, and a run records which lock it ran on."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from peftseg.environment import (LOCK_FILE, NOT_LOCKED, canonical, installed_not_in_lock, lock_differences,
                                 lock_state, locked_versions, version_drift, versions)

ROOT = Path(__file__).resolve().parent.parent


def test_pip_list_after_setup_is_the_lock():
    listed = json.loads(subprocess.run([sys.executable, "-m", "pip", "list", "--format=json",
                                        "--disable-pip-version-check"],
                                       capture_output=True, text=True, check=True).stdout)
    installed = {canonical(d["name"]): d["version"] for d in listed}
    locked = locked_versions()
    assert {n: v for n, v in installed.items() if n not in NOT_LOCKED} == locked
    assert {"torch", "peft", "transformers", "optuna", "mlflow-skinny", "onnxruntime"} <= locked.keys()


def test_every_lock_entry_is_pinned_with_hashes_and_no_index_is_named():
    text = LOCK_FILE.read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text[re.search(r"^[A-Za-z0-9]", text, re.M).start():])
    assert len(entries) > 100
    for entry in entries:
        first = entry.splitlines()[0]
        assert re.match(r"[A-Za-z0-9._-]+==\S+", first), first
        assert "--hash=sha256:" in entry, first
    assert not re.search(r"^\s*(-i|--index-url|--extra-index-url|-f|--find-links)\b", text, re.M)


def test_the_lock_satisfies_every_requirement_setup_installs_from_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():  # every extra: setup installs them all
        wanted += extra
    for source in ("setup.in", "detectron2.in"):
        lines = (line.split("#", 1)[0].strip() for line in (ROOT / "requirements" / source).read_text().splitlines())
        wanted += [line for line in lines if line]
    locked = locked_versions()
    unmet = []
    for line in wanted:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate():
            continue
        have = locked.get(canonical(req.name))
        if have is None or not req.specifier.contains(have, prereleases=True):
            unmet.append(f"{line} (lock: {have})")
    assert unmet == [], "run bash scripts/update_lock.sh: " + "; ".join(unmet)


def test_dependencies_whose_internals_the_code_uses_are_capped():
    deps = {canonical(Requirement(d).name): Requirement(d)
            for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    deps |= {canonical(Requirement(d).name): Requirement(d) for d in extras["search"]}
    caps = {"peft": "0.23", "transformers": "6", "hydra-core": "1.4", "omegaconf": "2.4", "optuna": "6",
            "torch": "2.15"}
    for name, cap in caps.items():
        assert any(s.operator == "<" and s.version == cap for s in deps[name].specifier), (name, deps[name])


def test_a_run_records_the_lock_it_ran_on_and_loading_names_what_moved(tmp_path):
    assert re.fullmatch(r"[0-9a-f]{16}", lock_state())  # setup installed exactly the lock
    assert lock_differences() == [] and installed_not_in_lock() == []
    assert versions()["lock"] == lock_state()
    # another lock than the environment's: its hash, marked as not matching
    other = tmp_path / "setup.lock"
    other.write_text(LOCK_FILE.read_text().replace(f"peft=={locked_versions()['peft']}", "peft==0.21.2"))
    assert lock_state(other).endswith("+modified")
    assert lock_differences(other) == [f"peft: locked 0.21.2, installed {locked_versions()['peft']}"]
    assert lock_state(tmp_path / "absent.lock") == "none"
    now = versions()
    assert version_drift(now) is None and version_drift(None) is None
    assert version_drift({**now, "peft": "0.21.2", "timm": "0.1"}) == f"peft 0.21.2 -> {now['peft']}"


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"peftseg_setup_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setup_says_each_locked_package_in_one_numbered_line_and_passes_the_rest_through():
    progress = _script("pip_progress")
    pip = """\
Ignoring pywin32: markers 'sys_platform == "win32"' don't match your environment
Collecting absl-py==2.1.0 (from -r requirements/setup.lock (line 7))
  Using cached absl_py-2.1.0-py3-none-any.whl (133 kB)
Collecting torch==2.5.1 (from -r requirements/setup.lock (line 2034))
  Downloading torch-2.5.1-cp311-cp311-manylinux1_x86_64.whl (906.4 MB)
Requirement already satisfied: numpy==2.1.0 in ./.venv/lib/python3.11/site-packages (from -r x (line 9))
Installing collected packages: absl-py, torch
  Attempting uninstall: torch
    Found existing installation: torch 2.4.0
    Uninstalling torch-2.4.0:
      Successfully uninstalled torch-2.4.0
Successfully installed absl-py-2.1.0 torch-2.5.1
a line pip adds in a later version
""".splitlines()
    assert list(progress.compact(pip, 174)) == [  # 173: one entry is for Windows
        "setup: [  1/173] absl-py==2.1.0 (133 kB, in pip's cache)",
        "setup: [  2/173] torch==2.5.1 (906.4 MB, downloading)",
        "setup: [  3/173] numpy==2.1.0 (already installed)",
        "setup: installing 2 package(s) into .venv (unpacking torch and its CUDA libraries takes a few minutes)",
        "a line pip adds in a later version",
    ]
    assert progress.locked_count(str(LOCK_FILE)) >= len(locked_versions()) > 100  # theirs: this platform's only


def test_the_detectron2_rebuild_says_each_step(tmp_path, monkeypatch, capsys):
    import zipfile

    build = _script("build_detectron2")
    source = tmp_path / "sal_detectron2-0.7.2-cp310-none-any.whl"
    with zipfile.ZipFile(source, "w") as z:
        z.writestr("detectron2/__init__.py", "__version__ = '0.7.2'\n")
        z.writestr("detectron2/_C.cpython-310-x86_64-linux-gnu.so", b"\0")
        z.writestr("sal_detectron2-0.7.2.dist-info/METADATA", "Name: sal-detectron2\n")
    installed = []
    monkeypatch.setattr(build, "download", lambda dest: source)
    monkeypatch.setattr(build.subprocess, "run", lambda cmd, check: installed.append(cmd[-1]))
    build.main()
    lines = capsys.readouterr().err.splitlines()  # not a terminal: plain lines
    assert [line.split(" ", 2)[1] for line in lines if line.startswith("detectron2: [")] == ["[1/3]", "[2/3]", "[3/3]"]
    assert "detectron2: [1/3] downloading sal-detectron2==0.7.2 from your package index" in lines[0]
    assert lines[-1].startswith("detectron2: installed detectron2 0.7.2 in ")
    (wheel,) = installed
    assert wheel.endswith("detectron2-0.7.2-py3-none-any.whl")


def test_packages_a_library_puts_on_sys_path_are_not_the_environment(tmp_path, monkeypatch):
    """Building peft's BOFT CUDA extension puts setuptools' vendored packages (an older packaging,
    zipp, …) on sys.path for the rest of the process; the lock state of a later run must not change."""
    import sys

    from peftseg.environment import installed_versions, lock_state

    before, state = installed_versions(), lock_state()
    for name in ("packaging", "vendoredonly"):
        info = tmp_path / f"{name}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    assert installed_versions() == before
    assert lock_state() == state
