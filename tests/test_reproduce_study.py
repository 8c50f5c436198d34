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


def test_lora_variants_grid_sweeps_every_start_optimizer_and_rank_pattern_on_both_tiny_models():
    import importlib.util
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from peftseg.config import compose_config, validate
    from peftseg.methods.lora import INITS

    spec = importlib.util.spec_from_file_location("reproduce_study", ROOT / "scripts" / "reproduce_study.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = script.overrides(*script.parse(["--lora-variants", "--smoke", "train.max_iter=2"]))
    assert argv[0] == "-m" and argv[-1] == "train.max_iter=2"
    parsed = OverridesParser.create().parse_overrides(argv[1:])
    axes = {o.get_key_element(): list(o.sweep_string_iterator()) for o in parsed if o.is_sweep_override()}
    assert axes == {"method.init": list(INITS), "train.optimizer": ["adamw", "loraplus"],
                    "method.rank_pattern": ["null", "{mlp:16}"], "model": ["maskdino_tiny", "seem_tiny"]}
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    members = list(itertools.product(*([f"{k}={v}" for v in vs] for k, vs in axes.items())))
    assert len(members) == len(INITS) * 2 * 2 * 2
    # the grid's corners compose and pass the run's checks (each member is a valid run config)
    for member in (members[0], members[-1]):
        cfg = compose_config([*fixed, *member])
        validate(cfg)
        assert cfg.method.name == "lora" and list(cfg.method.targets) == ["attn_qkv", "attn_proj", "mlp"]
    assert cfg.method.init == "corda" and cfg.train.optimizer == "loraplus" and dict(cfg.method.rank_pattern) == {"mlp": 16}
