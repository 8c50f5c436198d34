"""Multi-process training through detectron2's launch: 2 CPU processes with gloo."""

import re

import pytest
from omegaconf import OmegaConf

from conftest import records_under

from peftseg.config import TrainConfig
from peftseg.engine.distributed import check
from peftseg.errors import UserError


def test_two_gloo_processes_train_and_write_one_record(peftseg, tmp_path):
    proc = peftseg("train", "train=smoke", "train.max_iter=6", "train.num_gpus=2")
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
