"""scripts/benchmark.py: methods side by side on one model, batch and process."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def bench(tmp_path, shapes_cache, *args):
    env = {**os.environ, "PEFTSEG_CACHE": str(shapes_cache), "COLUMNS": "200"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)


def test_benchmark_reports_time_and_memory_ratios_against_full(tmp_path, shapes_cache):
    out = tmp_path / "bench.json"
    proc = bench(tmp_path, shapes_cache, "--methods", "full,heads,lora,full-again:full,lora+ckpt:lora:"
                 "train.activation_checkpointing=true", "--override", "train.seed=1", "--steps", "2",
                 "--rounds", "2", "--device", "cpu", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    methods = result["methods"]
    assert list(methods) == ["full", "heads", "lora", "full-again", "lora+ckpt"]
    assert result["overrides"] == ["train.seed=1"]
    # the same method measured later in the run measures the same (the CPU step peak once
    # carried every earlier method's allocations over)
    assert methods["full-again"]["peak_memory_bytes"] == methods["full"]["peak_memory_bytes"]
    # the breakdown adds up to the peak, and recomputing blocks stores fewer activations
    for m in methods.values():
        parts = m["weights_bytes"] + m["optimizer_state_bytes"] + m["gradients_bytes"] + m["activations_bytes"]
        assert parts == m["peak_memory_bytes"]
    assert methods["lora+ckpt"]["activation_checkpointing"] and not methods["lora"]["activation_checkpointing"]
    assert methods["lora+ckpt"]["activations_bytes"] < methods["lora"]["activations_bytes"]
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


def test_labelled_variants_parse_with_colons_and_lists_in_values():
    from peftseg.errors import UserError
    from peftseg.variants import parse_entry, split_entries

    arg = "full,lora+ckpt:lora:train.activation_checkpointing=true,last4:lora:method.blocks=last:4:method.rank=4," \
          "idx:lora:method.blocks=[8,9]"
    entries = [parse_entry(e) for e in split_entries(arg)]
    assert entries == [
        ("full", "full", []),
        ("lora+ckpt", "lora", ["train.activation_checkpointing=true"]),
        ("last4", "lora", ["method.blocks=last:4", "method.rank=4"]),
        ("idx", "lora", ["method.blocks=[8,9]"]),
    ]
    with pytest.raises(UserError, match="not KEY=VALUE"):
        parse_entry("x:lora:rank")
    with pytest.raises(UserError, match="LABEL:METHOD"):
        parse_entry(":lora")
