"""The runner end to end: through the real CLI where the CLI is what is tested, in-process otherwise."""

from pathlib import Path

from conftest import records_under
from helpers import cli_in_process, run_in_process

from peftseg.data.shapes import write_coco_layout


def test_smoke_run_trains_evaluates_and_records(peftseg, tmp_path):
    proc = peftseg("train", "train=smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (record,) = records_under(tmp_path / "outputs")
    assert record["status"] == "ok"
    assert record["config"]["model.name"] == "vitdet_tiny"
    assert record["config"]["train.name"] == "smoke"
    assert record["metrics"]["segm"]["AP"] > 0
    assert record["metrics"]["bbox"]["AP"] > 0
    params = record["params"]
    assert 0 < params["trainable"] < params["total"]
    # the same float64 division of the same two integers, and JSON round-trips a float exactly: equal
    assert params["ratio"] == params["trainable"] / params["total"]
    eff = record["efficiency"]
    assert eff["mean_step_time_s"] > 0 and eff["peak_memory_bytes"] > 0 and eff["checkpoint_bytes"] > 0
    run_dir = Path(record["run"]["dir"])
    assert (run_dir / "model_final.safetensors").stat().st_size == eff["checkpoint_bytes"]
    assert (run_dir / "metrics.json").exists()
    assert not list(run_dir.glob(".*.tmp"))
    # The console table carries the headline numbers.
    assert "mask AP" in proc.stdout and "trainable %" in proc.stdout
    assert f"{record['metrics']['segm']['AP']:.2f}" in proc.stdout


def test_lora_on_a_coco_layout_directory(tmp_path, shapes_cache, monkeypatch):
    datasets = tmp_path / "d2data"
    write_coco_layout(datasets / "coco", num_train=24, num_val=8, image_size=128, seed=3)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))  # read when the dataset is registered
    record = run_in_process(tmp_path, shapes_cache, "method=lora", "dataset=coco", "train.max_iter=10",
                            "train.warmup_iters=0", "model.score_thresh_test=0.0")
    assert record.status == "ok", record.error
    assert record.config["dataset.name"] == "coco" and record.config["method.name"] == "lora"
    assert record.data["train_images"] == 24
    assert record.mask_ap is not None


def test_heads_method_freezes_backbone(tmp_path, shapes_cache):
    run_in_process(tmp_path, shapes_cache, "method=heads", "model=vitdet_tiny", "train.max_iter=4", "train.warmup_iters=0",
                   "model.score_thresh_test=0.0")
    (record,) = records_under(tmp_path)
    groups = record["params"]["by_group"]
    assert groups["backbone"]["trainable"] == 0
    assert record["params"]["trainable"] == record["params"]["total"] - groups["backbone"]["total"]


def test_help_lists_commands_and_groups(tmp_path, shapes_cache):
    top = cli_in_process("--help", cwd=tmp_path, cache=shapes_cache)
    assert top.returncode == 0 and "train" in top.stdout
    train_help = cli_in_process("train", "--help", cwd=tmp_path, cache=shapes_cache)
    assert train_help.returncode == 0
    for group in ("model:", "method:", "dataset:", "train:"):
        assert group in train_help.stdout
    assert "vitdet_tiny" in train_help.stdout and "lora" in train_help.stdout
