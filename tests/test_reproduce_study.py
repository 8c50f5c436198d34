"""scripts/reproduce_study.py --smoke: the study's grid as one multirun on maskdino_tiny, then
the report against `full`."""

import csv
import subprocess
import sys
from pathlib import Path

from conftest import records_under
from helpers import cli_env

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_grid_runs_every_setting_and_reports_against_full(tmp_path, shapes_cache):
    env = cli_env(shapes_cache)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "reproduce_study.py"), "--smoke", "train.max_iter=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = records_under(tmp_path / "multirun")
    assert len(records) == 8 and all(r["status"] == "ok" for r in records)
    by_setting = {}
    for r in records:
        cfg = r["config"]
        key = (cfg.get("method.name"), cfg.get("method.adapters_per_block"), str(cfg.get("method.targets")))
        by_setting[key] = r
    assert len(by_setting) == 8  # eight distinct settings, not one repeated
    ratios = sorted(r["params"]["ratio"] for r in records)
    assert ratios[-1] == 1.0 and ratios[0] < 0.5  # full trains everything; PEFT far less
    (table,) = list((tmp_path / "multirun").glob("*/*/*.csv"))
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 8 and "baseline.delta_mask_AP" in rows[0]
