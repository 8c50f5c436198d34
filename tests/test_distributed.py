"""Multi-process training through detectron2's launch: 2 CPU processes with gloo."""

import json
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import records_under

from peftseg.config import TrainConfig
from peftseg.engine.distributed import check
from peftseg.errors import UserError
from helpers import cli_env


def test_two_gloo_processes_train_and_write_one_record(peftseg, tmp_path):
    proc = peftseg("train", "train=smoke", "train.max_iter=6", "train.warmup_iters=0", "model.score_thresh_test=0.0", "train.num_gpus=2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (record,) = records_under(tmp_path / "outputs")
    assert record["status"] == "ok"
    assert record["config"]["train.num_gpus"] == 2
    eff = record["efficiency"]
    assert eff["num_processes"] == 2 and eff["device"] == "cpu"
    assert eff["mean_step_time_s"] > 0 and eff["checkpoint_bytes"] > 0
    assert "AP" in record["metrics"]["segm"] and "AP" in record["metrics"]["bbox"]
    # Rank 0 tells the story (rank 1 logs warnings only), the table comes once;
    # train.ims_per_batch=4 is the total, 2 per process.
    assert proc.stdout.count("Starting training from iteration 0") == 1
    assert proc.stdout.count("mask AP") == 1
    assert "batch_size=2" in proc.stdout
    assert (tmp_path / record["run"]["id"] / "train.log").stat().st_size > 0


def test_a_failing_rank_leaves_one_failed_record_and_the_users_message(peftseg, tmp_path):
    # a target group vitdet lacks: valid at compose time, refused inside every rank
    proc = peftseg("train", "train=smoke", "train.num_gpus=2", "method.targets=[deform_attn]")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (record,) = records_under(tmp_path / "outputs")
    assert record["status"] == "failed" and record["error"]["type"] == "UserError"
    assert "names ['deform_attn'], which model family 'vitdet' does not define" in " ".join(proc.stderr.split())


def _train(**kw):
    return OmegaConf.structured(TrainConfig(**kw))


@pytest.mark.parametrize("kw, fix", [
    ({"num_gpus": 2, "ims_per_batch": 3}, "train.ims_per_batch=2"),
    ({"num_gpus": 0}, "at least 1"),
    ({"num_machines": 2, "machine_rank": 2}, "train.machine_rank"),
    ({"num_machines": 2, "ims_per_batch": 4}, "train.dist_url=tcp://"),
])
def test_bad_process_layouts_name_the_fix(kw, fix, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(UserError, match=re.escape(fix)):
        check(_train(**kw))


def test_sigterm_to_the_launcher_stops_every_rank_with_a_checkpoint(tmp_path, shapes_cache):
    """What SLURM does: SIGTERM to the launching process. The ranks stop at one step boundary,
    rank 0 saves and records "interrupted", the launcher exits 128 + 15."""
    import signal
    import time

    env = cli_env(shapes_cache)
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftseg.cli", "train", "train=smoke", "train.num_gpus=2", "train.max_iter=2000",
         "train.log_period=1", "hydra.run.dir=run"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.json"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "interrupted" and record["interrupted"]["signal"] == "SIGTERM"
    it = record["interrupted"]["iteration"]
    assert 0 <= it < 1999 and (tmp_path / "run" / f"model_{it:07d}.pth").is_file()
    assert "train.resume=" in " ".join(out.split())


def test_a_search_prunes_a_trial_that_trains_in_two_processes(tmp_path, shapes_cache):
    """The pruner's decision is taken once, in rank 0 (which opens the trial from the study's
    storage), and every rank stops at that evaluation; the trial is PRUNED, its record "pruned"."""
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    # every AP is below 101: the threshold pruner stops the trial at its first evaluation
    proc = subprocess.run(
        [sys.executable, "-m", "peftseg.cli", "search", "train=smoke", "train.max_iter=3", "train.warmup_iters=0",
         "train.eval_period=1", "train.ims_per_batch=2", "train.progress=false", "train.num_gpus=2",
         "train.device=cpu", "dataset.num_train=8", "dataset.num_val=2", "model.score_thresh_test=0.0",
         "search.methods=[heads]", "search.n_trials=1", "search.pruner=threshold", "search.prune_below=101",
         f"search.storage={storage}"],
        cwd=tmp_path, env=cli_env(shapes_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pruned: segm AP" in proc.stdout and "no trial will be pruned" not in proc.stdout
    (record,) = records_under(tmp_path / "search")
    assert record["status"] == "pruned" and record["efficiency"] is None
    assert record["config"]["train.num_gpus"] == 2
    assert record["pruned"]["iteration"] == 1 and "judged by the study's pruner" in record["pruned"]["reason"]
    (trial,) = optuna.load_study(study_name="peft_search", storage=storage).get_trials()
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [1]
    assert "study 'peft_search': 0 complete, 1 pruned, 0 failed" in proc.stdout
