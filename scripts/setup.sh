#!/usr/bin/env bash
# Create .venv and install everything peftseg needs, from the package registries only.
# Idempotent: when nothing the install depends on has changed, a rerun is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${PEFTSEG_VENV:-.venv}
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")

stamp_inputs() { cat pyproject.toml scripts/setup.sh scripts/build_detectron2.py | sha256sum | cut -d' ' -f1; }
STAMP="$VENV/.peftseg-setup"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_inputs)" ] \
   && "$VENV/bin/python" -c "import torch, torchvision, detectron2, peftseg" 2>/dev/null; then
  echo "setup: $VENV is up to date"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

# torch and torchvision must be a matched pair: the CPU torch wheel some machines carry
# on disk has no torchvision that loads against it.
"${PIP[@]}" "${TORCH_PINS[@]}" "setuptools<81"

# Keep a Detectron2 the user already has (e.g. built from source).
if ! "$VENV/bin/python" -c "import detectron2" 2>/dev/null; then
  echo "setup: installing detectron2 (pure-Python rebuild of sal-detectron2 0.7.2)"
  "$VENV/bin/python" scripts/build_detectron2.py
fi

"${PIP[@]}" -e ".[test,tracking,search,cityscapes]" "${TORCH_PINS[@]}"
# dataset=cityscapes: Cityscapes' labels and instance AP; --no-deps because its metadata pulls
# the `typing` backport (its real dependencies are in the `cityscapes` extra above)
"${PIP[@]}" --no-deps "cityscapesscripts>=2.2"
# the Hydra Optuna sweeper of older setups pins optuna<3; peftseg search replaced it
"$VENV/bin/python" -m pip uninstall -y -q hydra-optuna-sweeper 2>/dev/null || true
stamp_inputs > "$STAMP"
echo "setup: done ($VENV)"
