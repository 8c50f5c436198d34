#!/usr/bin/env bash
# Move requirements/setup.lock to the newest releases, on purpose: resolve every package
# scripts/setup.sh installs (pyproject.toml's dependencies and extras, requirements/setup.in,
# Detectron2's requirements) with exact versions and sha256 hashes, install it, run the suite,
# and keep the new lock only if the suite passes. Otherwise the previous lock is put back.
#
#   bash scripts/update_lock.sh             # refresh, install, test
#   bash scripts/update_lock.sh --no-test   # only write the new lock (review the diff, then test)
#   bash scripts/update_lock.sh --keep-pins [--no-test]
#       # lock a dependency added to pyproject.toml or requirements/*.in without moving the
#       # others: every package already locked keeps its version where it still fits
set -euo pipefail
cd "$(dirname "$0")/.."

LOCK=requirements/setup.lock
UV_VERSION=0.13.10  # the resolver; a newer one may resolve the same inputs differently
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
NO_TEST=0; UPGRADE=(--upgrade)
for arg in "$@"; do
  case "$arg" in
    --no-test) NO_TEST=1 ;;
    --keep-pins) UPGRADE=() ;;
    *) echo "update_lock: unknown option $arg (options: --no-test, --keep-pins)" >&2; exit 2 ;;
  esac
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# without --upgrade, uv prefers the versions already in its output file: start it from the lock
[ ${#UPGRADE[@]} -eq 0 ] && [ -f "$LOCK" ] && cp "$LOCK" "$tmp/setup.lock"
"$PYTHON" -m venv "$tmp/uv"
"$tmp/uv/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"

# --universal: one lock for every platform (markers say where a package applies);
# python 3.11 is the oldest interpreter setup.sh accepts. uv writes no index URL into the file.
# --all-extras: every optional group in pyproject.toml (test, tracking, search, cityscapes, docs),
# so a new extra is locked, and installed by setup.sh, without an edit here.
"$tmp/uv/bin/uv" pip compile pyproject.toml requirements/setup.in requirements/detectron2.in \
  --all-extras \
  --override requirements/overrides.txt \
  --universal --python-version 3.11 --generate-hashes "${UPGRADE[@]}" \
  --custom-compile-command "bash scripts/update_lock.sh" \
  --output-file "$tmp/setup.lock" --quiet

echo "update_lock: what moved (package: old -> new):"
"$PYTHON" - "$LOCK" "$tmp/setup.lock" <<'PY'
import re, sys
from pathlib import Path

def pins(path):
    p = Path(path)
    text = p.read_text() if p.is_file() else ""
    found = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)(?: ;([^\\]*))?", text, re.M)
    return {(name.lower(), (marker or "").strip()): version for name, version, marker in found}

old, new = pins(sys.argv[1]), pins(sys.argv[2])
moved = [f"  {n}{' ; ' + m if m else ''}: {old.get((n, m), '-')} -> {new.get((n, m), '-')}"
         for n, m in sorted(old.keys() | new.keys()) if old.get((n, m)) != new.get((n, m))]
print("\n".join(moved) or "  nothing")
PY

[ -f "$LOCK" ] && cp "$LOCK" "$tmp/previous.lock"
cp "$tmp/setup.lock" "$LOCK"
if [ "$NO_TEST" = 1 ]; then
  echo "update_lock: wrote $LOCK (not installed, not tested)"
  exit 0
fi
if bash scripts/setup.sh && .venv/bin/python -m pytest -q; then
  echo "update_lock: $LOCK refreshed; the suite passes with it: commit it"
else
  if [ -f "$tmp/previous.lock" ]; then
    cp "$tmp/previous.lock" "$LOCK"
    echo "update_lock: the suite fails with the newest releases; $LOCK is back to what it was." >&2
    echo "  Make the code right for them (the new lock is printed above), or rerun" >&2
    echo "  bash scripts/setup.sh to put .venv back on the committed lock." >&2
  fi
  exit 1
fi
