"""scripts/benchmark.py: methods side by side on one model, batch and process."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def bench(tmp_path, shapes_cache, *args):
    env = {**os.environ, "PEFTSEG_CACHE": str(shapes_cache), "COLUMNS": "200"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)


def test_benchmark_reports_time_and_memory_ratios_against_full(tmp_path, shapes_cache):
    out = tmp_path / "bench.json"
    proc = bench(tmp_path, shapes_cache, "--methods", "full,heads,lora", "--steps", "2", "--rounds", "2",
                 "--device", "cpu", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    methods = result["methods"]
    assert list(methods) == ["full", "heads", "lora"]
    assert methods["full"]["step_time_ratio"] == 1.0 and methods["full"]["peak_memory_ratio"] == 1.0
    for m in methods.values():
        assert m["step_time_s"] > 0 and m["peak_memory_bytes"] > 0 and m["step_time_ratio"] > 0
    assert methods["heads"]["trainable"] < methods["full"]["trainable"]
    assert result["steps_per_method"] == 4
    # Frozen backbone: no gradients or AdamW state for it, so less memory than full.
    assert methods["heads"]["peak_memory_ratio"] < 1.0
    assert "× full" in proc.stdout and "heads" in proc.stdout


def test_benchmark_names_the_registered_methods_for_an_unknown_one(tmp_path, shapes_cache):
    proc = bench(tmp_path, shapes_cache, "--methods", "full,nosuch")
    assert proc.returncode == 2
    assert "nosuch" in proc.stderr and "lora" in proc.stderr
