#!/usr/bin/env bash
# Create .venv and install exactly requirements/setup.lock into it (every package, transitive
# ones included, at its locked version, each file checked against its locked sha256), then
# Detectron2 (rebuilt from a hash-pinned wheel) and peftseg itself. From the package registries
# only. Idempotent: when nothing the install depends on has changed, a rerun is a no-op.
# The lock moves only through scripts/update_lock.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${PEFTSEG_VENV:-.venv}
LOCK=requirements/setup.lock

stamp_inputs() {
  cat pyproject.toml "$LOCK" scripts/setup.sh scripts/build_detectron2.py requirements/detectron2.in | sha256sum | cut -d' ' -f1
}
STAMP="$VENV/.peftseg-setup"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_inputs)" ] \
   && "$VENV/bin/python" -c "import torch, torchvision, detectron2, peftseg" 2>/dev/null; then
  echo "setup: $VENV is up to date"
  exit 0
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: $LOCK is resolved for Python 3.11 and newer, and $PYTHON is $("$PYTHON" -V 2>&1);" \
       "install Python 3.11+ and run PYTHON=python3.11 bash scripts/setup.sh" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || { echo "setup: creating $VENV with $PYTHON"; "$PYTHON" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

echo "setup: [1/4] installing the $(grep -c '^[A-Za-z0-9][A-Za-z0-9._-]*==' "$LOCK") packages of $LOCK into" \
     "$VENV (torch with its CUDA libraries is several GB the first time)"
# --no-deps: the lock already holds the whole resolved set, so pip resolves nothing and takes
# nothing the lock does not name; --require-hashes: a file whose sha256 differs is refused.
# pip's own lines (not -q), one per package through pip_progress.py; its errors go to stderr as they are
"$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off --no-deps --require-hashes \
  -r "$LOCK" | "$PYTHON" scripts/pip_progress.py "$LOCK" "$VENV"

# Keep a Detectron2 the user already has (e.g. built from source).
if ! "$VENV/bin/python" -c "import detectron2" 2>/dev/null; then
  echo "setup: [2/4] installing detectron2 (pure-Python rebuild of sal-detectron2 0.7.2)"
  "$VENV/bin/python" scripts/build_detectron2.py
else
  echo "setup: [2/4] keeping the detectron2 already in $VENV"
fi

echo "setup: [3/4] installing peftseg itself (editable: this checkout)"
# the build backend (setuptools) is the locked one in the venv: no unpinned build download
"${PIP[@]}" --no-deps --no-build-isolation -e .

# An existing venv may still hold packages the lock no longer names (an earlier setup, the
# Hydra Optuna sweeper of older setups): pip has no "sync", so remove them here.
echo "setup: [4/4] checking $VENV holds nothing the lock does not name"
"$VENV/bin/python" - "$LOCK" <<'PY'
import subprocess, sys
from peftseg.environment import installed_not_in_lock

extra = installed_not_in_lock(sys.argv[1])
if extra:
    print(f"setup: removing {len(extra)} package(s) the lock does not name: {', '.join(extra)}")
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *extra], check=True)
PY
stamp_inputs > "$STAMP"
echo "setup: done ($VENV matches $LOCK)"
