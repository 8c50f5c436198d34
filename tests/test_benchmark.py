"""scripts/benchmark.py: methods side by side on one model, batch and process."""

import importlib.util
import json
import subprocess

import pytest

from conftest import ROOT


@pytest.fixture
def bench(shapes_cache, monkeypatch, capsys):
    """scripts/benchmark.py's main(), in this process: a CompletedProcess of its exit status and output."""
    spec = importlib.util.spec_from_file_location("peftseg_benchmark_script", ROOT / "scripts" / "benchmark.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setenv("PEFTSEG_CACHE", str(shapes_cache))
    monkeypatch.setenv("COLUMNS", "200")

    def _run(*args):
        code = script.main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["benchmark.py", *args], code, out.out, out.err)

    return _run


def test_benchmark_reports_time_and_memory_ratios_against_full(tmp_path, bench):
    out = tmp_path / "bench.json"
    proc = bench("--methods", "full,heads,lora,full-again:full,lora+ckpt:lora:"
                 "train.activation_checkpointing=true", "--override", "train.seed=1", "--steps", "2",
                 "--repeat", "2", "--device", "cpu", "--json", str(out))
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
    assert result["steps_per_method"] == 4 and result["repeat"] == 2
    for m in methods.values():  # the quartiles and the rounds' ratios bracket the medians
        assert m["step_time_min_s"] <= m["step_time_p25_s"] <= m["step_time_s"] <= m["step_time_p75_s"] <= m["step_time_max_s"]
        assert m["step_time_ratio_min"] <= m["step_time_ratio"] <= m["step_time_ratio_max"]
        assert len(m["step_time_rounds_s"]) == 2
    # Frozen backbone: no gradients or AdamW state for it, so less memory than full.
    assert methods["heads"]["peak_memory_ratio"] < 1.0
    assert "× full" in proc.stdout and "heads" in proc.stdout


def _script():
    spec = importlib.util.spec_from_file_location("peftseg_benchmark_script", ROOT / "scripts" / "benchmark.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_rows_alternate_and_ratios_pair_each_round_with_its_neighbour():
    """Rows are visited A B A B … (each visit: one untimed step, then the timed ones), and a row's
    ratio is the median of its per-round ratios: a slowdown that hits one whole round (both rows
    alike) leaves the ratio alone, where a ratio of overall medians would move."""
    script = _script()
    visits = []
    # round times: the baseline 1 s, the other 2 s, except round 2 when the machine ran 10x slower
    times = {"A": iter([1.0, 10.0, 1.0]), "B": iter([2.0, 20.0, 2.0])}

    class Row:
        def __init__(self, name):
            self.name, self.rounds = name, []

        def step(self, batch):
            visits.append(self.name + "-warm")

        def timed_step(self, batch):
            visits.append(self.name)
            return next(times[self.name])

    a, b = Row("A"), Row("B")
    script.alternate([a, b], batch=None, repeat=3, steps=1)
    assert visits == ["A-warm", "A", "B-warm", "B"] * 3
    assert a.rounds == [[1.0], [10.0], [1.0]]
    rows = {r.name: {"step_time_rounds_s": [t for (t,) in r.rounds]} for r in (a, b)}
    assert script.pair_ratios(rows["B"], rows["A"]) == {
        "step_time_ratio": 2.0, "step_time_ratio_min": 2.0, "step_time_ratio_max": 2.0}
    stats = script.step_time_stats([1.0, 10.0, 1.0, 3.0])
    assert stats["step_time_s"] == 2.0 and stats["step_time_p25_s"] == 1.0 and stats["step_time_p75_s"] == 4.75


def test_benchmark_names_the_registered_methods_for_an_unknown_one(bench):
    proc = bench("--methods", "full,nosuch")
    assert proc.returncode == 2
    assert "nosuch" in proc.stderr and "lora" in proc.stderr


def test_labelled_variants_parse_with_colons_and_lists_in_values():
    from peftseg.errors import UserError
    from peftseg.cli.variants import parse_entry, split_entries

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


def test_benchmark_peer_row_and_stock_baseline(tmp_path, bench):
    """--peer adds detectron2's SimpleTrainer on the stock-attention model; --baseline names
    the row ratios are taken against."""
    out = tmp_path / "bench.json"
    proc = bench("--methods", "full,stock:full:model.attention=detectron2", "--peer", "--baseline", "stock",
                 "--steps", "1", "--repeat", "1", "--device", "cpu", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    methods = result["methods"]
    assert list(methods) == ["full", "stock", "peer"] and result["baseline"] == "stock"
    assert methods["stock"]["step_time_ratio"] == 1.0 and methods["stock"]["peak_memory_ratio"] == 1.0
    assert methods["full"]["attention"] == "efficient"
    assert methods["stock"]["attention"] == methods["peer"]["attention"] == "detectron2"
    assert methods["peer"]["loop"].startswith("detectron2 SimpleTrainer")
    assert methods["full"]["loop"] == "SimpleTrainer"  # peftseg's fp32 trainer is detectron2's
    assert methods["peer"]["trainable"] == methods["stock"]["trainable"] == methods["full"]["trainable"]
    # the same weights and batch: stock and peer hold the same parameters, grads and AdamW state
    for key in ("weights_bytes", "gradients_bytes", "optimizer_state_bytes"):
        assert methods["peer"][key] == methods["stock"][key], key
    assert "× stock" in proc.stdout and "peer" in proc.stdout
