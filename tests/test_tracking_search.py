"""Optuna search over PEFT configurations (hydra/sweeper=peft_search) and MLflow tracking."""

import os
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import records_under
from peftseg.errors import UserError
from peftseg.engine.objectives import directions, objective_values
from peftseg.io.atomic import write_json

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

TINY = ("train=smoke", "dataset.num_val=4", "hydra.sweeper.sampler.seed=0")


def _runs(store: Path):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # as peftseg.engine.tracking does for its default
    mlflow.set_tracking_uri(store.as_uri())
    runs = mlflow.search_runs(experiment_names=["peftseg"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def _artifacts(run) -> set[str]:
    client = mlflow.tracking.MlflowClient()
    found, todo = set(), [None]
    while todo:
        for a in client.list_artifacts(run.info.run_id, todo.pop()):
            (todo.append(a.path) if a.is_dir else found.add(a.path))
    return found


def test_objectives_and_their_directions():
    record = {"status": "ok", "metrics": {"segm": {"AP": 12.5}}, "params": {"ratio": 0.02},
              "efficiency": {"peak_memory_bytes": 2 ** 31}}
    assert objective_values(record, "segm_ap") == 12.5
    assert objective_values(record, ["segm_ap", "trainable_pct", "peak_memory"]) == [12.5, 2.0, 2.0]
    assert objective_values({**record, "status": "failed"}, "segm_ap") is None  # a failed trial, not 0
    assert directions("segm_ap") == "maximize"
    assert directions(["segm_ap", "trainable_pct"]) == ["maximize", "minimize"]
    with pytest.raises(UserError, match="objective='ap' is not a known objective"):
        directions("ap")


def test_single_objective_search_completes(peftseg, tmp_path):
    proc = peftseg("train", "-m", "hydra/sweeper=peft_search", "hydra.sweeper.n_trials=2", *TINY,
                   "train.max_iter=2", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "multirun").glob("*/*")
    records = records_under(sweep_dir)
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    assert {r["config"]["method.name"] for r in records} <= {"lora", "adapter", "ia3", "loha"}
    result = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(max(r["metrics"]["segm"]["AP"] for r in records))
    assert result["best_params"]["method"] in {"lora", "adapter", "ia3", "loha"}


def test_two_objective_search_tracked_in_mlflow_gives_a_pareto_set(peftseg, tmp_path):
    store = tmp_path / "store"
    proc = peftseg("train", "-m", "hydra/sweeper=peft_search", "hydra/sweeper/sampler=nsgaii",
                   "hydra.sweeper.n_trials=2", "objective=[segm_ap,trainable_pct]", "+tracking=mlflow",
                   f"tracking.uri={store.as_uri()}", *TINY, "train.max_iter=2", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "multirun").glob("*/*")
    records = records_under(sweep_dir)
    result = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    # the Pareto set of (mask AP up, trainable % down) over the two trials
    points = sorted({(r["metrics"]["segm"]["AP"], 100 * r["params"]["ratio"]) for r in records})
    front = [p for p in points if not any(q != p and q[0] >= p[0] and q[1] <= p[1] for q in points)]
    assert sorted(tuple(s["values"]) for s in result["solutions"]) == [pytest.approx(p) for p in front]

    parents, children = _runs(store)
    assert len(parents) == 1 and len(children) == 2
    (parent,) = parents
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["model.name"] == "vitdet_tiny"
        assert child.data.params["method.name"] in {"lora", "adapter", "ia3", "loha"}
        assert "metrics.segm.AP" in child.data.metrics and child.data.metrics["params.trainable"] > 0
        assert {"results.json", "model_final.safetensors"} <= _artifacts(child)
    assert {"report/report.md", "report/report.csv", "report/pareto.png"} <= _artifacts(parent)


def test_a_failed_member_is_logged_failed_with_its_error(tmp_path):
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.types import RunMode

    from peftseg.engine.tracking import MlflowTracker

    store, run_dir = tmp_path / "store", tmp_path / "sweep" / "0"
    write_json(run_dir / "results.json", {
        "run": {"id": "0", "dir": str(run_dir), "start_time": "2026-01-01T00:00:00+00:00"}, "status": "failed", "config": {"method.name": "lora", "method.rank": 0},
        "error": {"type": "UserError", "message": "method.rank=0 must be >= 1"}})
    config = OmegaConf.create({
        "model": {"name": "vitdet_tiny"}, "method": {"name": "lora"},
        "hydra": {"mode": RunMode.MULTIRUN, "runtime": {"output_dir": str(run_dir)},
                  "sweep": {"dir": str(tmp_path / "sweep")}, "job": {"override_dirname": "method.rank=0"},
                  "overrides": {"task": ["method.rank=0"]}},
    })
    tracker = MlflowTracker(uri=store.as_uri())
    tracker.on_multirun_start(config)
    ret = JobReturn()
    ret.status = JobStatus.COMPLETED  # the task itself returns None for a failed run
    tracker.on_job_end(config, ret)
    parents, children = _runs(store)
    (child,) = children
    assert child.info.status == "FAILED"
    assert child.data.tags["peftseg.error"] == "UserError: method.rank=0 must be >= 1"
    assert child.data.params["method.rank"] == "0"
    assert "results.json" in _artifacts(child)
