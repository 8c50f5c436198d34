"""The documentation is tested: README.md and docs/ say what the code does.

- the site builds with `mkdocs build --strict` (the `docs` extra, which setup installs from the
  lock), and its generated pages hold every registered option, knob and command;
- every generated table of README.md and docs/ is what docs/hooks.py makes from the code and
  docs/benchmarks/*.json today, and every measurement file is shown somewhere;
- shell blocks marked `<!-- runnable: … -->` are run as written (smoke-sized) and their stated
  outcome is checked: the exit status, each `expect="…"` text in the output *and* in the page's
  visible text, and each file in `files="…"`;
- README.md stays a first-hour page, its test command is the one CI runs, and no page, module or
  test carries work history (issue numbers, session notes).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
# docs/hooks.py: the generators the site build runs (loaded by path: docs/ is not a package)
_spec = importlib.util.spec_from_file_location("peftseg_docs_hooks", DOCS / "hooks.py")
hooks = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hooks)

PAGES = [README, *sorted(DOCS.rglob("*.md"))]
RUNNABLE = re.compile(r"<!-- runnable(?::(?P<attrs>[^\n]*?))?\s*-->\n```(?:bash|sh|console)\n(?P<code>.*?)```", re.S)


def _visible(text: str) -> str:
    """A page's text as a reader sees it: no HTML comments, whitespace collapsed."""
    return " ".join(re.sub(r"<!--.*?-->", " ", text, flags=re.S).split())


def _blocks() -> list:
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in RUNNABLE.finditer(text):
            attrs: dict[str, list[str]] = {}
            for item in shlex.split(m.group("attrs") or ""):
                key, _, value = item.partition("=")
                attrs.setdefault(key, []).append(value)
            line = text[:m.start()].count("\n") + 1
            out.append(pytest.param(page, m.group("code"), attrs, id=f"{page.relative_to(ROOT)}:{line}"))
    return out


BLOCKS = _blocks()


# --- README: the first hour --------------------------------------------------------------

def test_the_readme_is_a_first_hour_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for heading in ("## Two commands", "## Your first study", "## What there is", "## Documentation"):
        assert heading in text, heading
    # the first study fits in 15 lines and shows its picture, which is committed
    study = text.split("## Your first study\n", 1)[1].split("\n## ", 1)[0].strip("\n")
    assert len(study.splitlines()) <= 15
    picture = re.search(r"!\[[^\]]*\]\((docs/[^)]+\.png)\)", study)
    assert picture and (ROOT / picture.group(1)).is_file()
    # the one-thread advice sits next to the first run command
    assert text.index("OMP_NUM_THREADS=1") < text.index("## Your first study")


def test_the_readme_test_command_is_the_one_ci_runs():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    command = ci[-1]
    assert command == "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
    two_commands = README.read_text().split("## Two commands", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert command in two_commands.splitlines()


def test_the_readme_links_resolve():
    for target in re.findall(r"\]\(((?:docs/)?[\w./-]+\.(?:md|png))(?:#[\w-]+)?\)", README.read_text()):
        assert (ROOT / target).is_file(), target


# --- generated tables ---------------------------------------------------------------------

def test_the_readme_tables_are_the_registry_today():
    text = README.read_text()
    assert text.count("<!-- gen: registry") == 3
    assert hooks.readme_with_tables(text) == text, "run: python docs/hooks.py --write-readme"


def test_every_generated_table_expands_and_every_measurement_is_shown():
    used = set()
    for page in PAGES:
        text = page.read_text()
        for name, args in hooks.GEN.findall(text):
            assert hooks.generate(name, args.split()), (page, name, args)
            used |= {a for a in args.split() if a.endswith(".json")}
    measured = {p.name for p in hooks.BENCHMARKS.glob("*.json")}
    assert measured - used == set(), "measurements no page shows"
    assert used - measured == set(), "pages show measurements that are not there"


def test_the_reference_pages_hold_every_option_knob_and_command():
    from peftseg.cli import COMMANDS
    from peftseg.registry import DATASETS, FAMILIES, METHODS

    config = hooks.config_reference()
    for spec in METHODS:
        assert f"### method={spec.name}" in config
    for spec in FAMILIES:
        assert f"### {spec.name}" in config
    for spec in DATASETS:
        assert f"### dataset={spec.name}" in config
    for knob in ("`train.max_iter`", "`method.rank`", "`method.adapter.bottleneck`", "`model.image_size`",
                 "`dataset.train_subset`", "`tracking.uri`"):
        assert knob in config, knob
    # what a knob accepts is the answer of its own check
    assert "| `method.adapters_per_block` | int | `2` | integer 0 to 4 |" in config
    assert "one of `adamw`, `sgd`" in config
    cli = hooks.cli_reference()
    for command in COMMANDS:
        assert f"## peftseg {command}\n" in cli
    assert "usage: peftseg report" in cli and "search.n_trials=N" in cli


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
                    reason="mkdocs / mkdocs-material are not installed: they come with the `docs` extra, which "
                           "scripts/setup.sh installs from requirements/setup.lock")
def test_the_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for page in ("index.html", "getting-started.html", "reference/config.html", "reference/cli.html",
                 "performance.html", "troubleshooting.html", "first_study_pareto.png"):
        assert (site / page).is_file(), page
    performance = (site / "performance.html").read_text()
    assert "<!-- gen:" not in performance and "8.97 GiB" in performance  # a table from vitdet_b_1024.json


# --- runnable blocks ----------------------------------------------------------------------

def test_some_blocks_are_runnable():
    assert {p.values[0].name for p in BLOCKS} >= {"README.md", "getting-started.md", "troubleshooting.md"}


@pytest.mark.parametrize("page, code, attrs", BLOCKS)
def test_a_runnable_block_does_what_its_page_says(page, code, attrs, tmp_path, shapes_cache):
    # `peftseg` and `source .venv/bin/activate` as after setup, for this checkout's code
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "peftseg").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m peftseg.cli "$@"\n')
    (venv_bin / "peftseg").chmod(0o755)
    (venv_bin / "activate").write_text(f'export PATH={shlex.quote(str(venv_bin))}:"$PATH"\n')
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "PEFTSEG_CACHE": str(shapes_cache),
           "OMP_NUM_THREADS": "1", "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=int(attrs.get("timeout", ["900"])[0]))
    output = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == int(attrs.get("exit", ["0"])[0]), proc.stdout[-3000:] + proc.stderr[-3000:]
    visible = _visible(page.read_text())
    for expect in attrs.get("expect", []):
        assert expect in output, f"{expect!r} is not in the output: {output[-2000:]}"
        assert " ".join(expect.split()) in visible, f"{expect!r} is checked but the page does not say it"
    for name in " ".join(attrs.get("files", [])).split():
        assert (tmp_path / name).is_file(), name


# --- no work history ----------------------------------------------------------------------

HISTORY = re.compile("|".join((
    r"\b[Ii]ssues? #?\d+",      # issue numbers
    r"\(#\d+\)",                # pull-request references
    r"\bPR #?\d+",
    r"this session",
    r"not re-timed",
    r"re-timed since",
    r"other (?:agents|sessions)",
    r"\(was[:\s]",              # "(was: …)": how it used to behave
    r"[Gg]oals of issue",
    r"\bthe issue's\b",
)))


def test_no_page_module_or_test_carries_work_history():
    files = [README, ROOT / "mkdocs.yml", *DOCS.rglob("*.md"), *DOCS.rglob("*.py"),
             *(ROOT / "peftseg").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
    found = []
    for path in files:
        if path.resolve() == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if HISTORY.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert found == []
