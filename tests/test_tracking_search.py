"""MLflow tracking (+tracking=mlflow): the default sqlite store, read back as MLflow's users do;
an explicit file store; objectives and their directions (peftseg search optimises them)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import cli_env
from conftest import ROOT
from peftseg.errors import UserError
from peftseg.experiments.objectives import directions, objective_values
from peftseg.io.atomic import write_json

mlflow = pytest.importorskip("mlflow")

TINY = ("train=smoke", "train.progress=false", "dataset.num_train=8", "dataset.num_val=2")


def _runs(store: Path):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # as peftseg.experiments.tracking does for a named file store
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
    # NaN AP (COCOEvaluator's answer when the model predicted nothing) is no score either
    assert objective_values({**record, "metrics": {"segm": {"AP": float("nan")}}}, "segm_ap") is None
    assert directions("segm_ap") == "maximize"
    assert directions(["segm_ap", "trainable_pct"]) == ["maximize", "minimize"]
    with pytest.raises(UserError, match="objective='ap' is not a known objective"):
        directions("ap")


def _env(cwd_cache) -> dict:
    """A subprocess env that runs this checkout's peftseg, with no MLflow setting at all."""
    return {k: v for k, v in cli_env(cwd_cache).items() if not k.startswith("MLFLOW_")}


# the docs' read-back snippet (docs/tracking.md), run where the sweep ran, with no tracking URI and no env var
READ_BACK = """
import json, mlflow
runs = mlflow.search_runs(experiment_names=["peftseg"])
print("URI", mlflow.get_tracking_uri())
print("RUNS", runs[["run_id", "status", "tags.mlflow.parentRunId", "params.method.name",
                    "metrics.params.trainable"]].to_json(orient="records"))
client = mlflow.MlflowClient()
(exp,) = [e for e in client.search_experiments() if e.name == "peftseg"]
print("CLIENT", len(client.search_runs([exp.experiment_id])))
"""


def test_a_tracked_sweep_lands_in_mlflows_default_sqlite_store(tmp_path, shapes_cache):
    env = _env(shapes_cache)
    proc = subprocess.run([sys.executable, "-m", "peftseg.cli", "train", "-m", "method=heads,bitfit",
                           "+tracking=mlflow", *TINY, "train.max_iter=2", "train.warmup_iters=0",
                           "model.score_thresh_test=0.0"], cwd=tmp_path, env=env,  # a 2-step model keeps its detections
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    store = f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    # the console says where it logged: the store and each run id
    said = re.findall(r"mlflow: (parent run|run) ([0-9a-f]{32}) in (\S+) \(experiment 'peftseg'\)", proc.stdout)
    assert [(kind, uri) for kind, _, uri in said] == [("parent run", store), ("run", store), ("run", store)]
    assert not list(tmp_path.glob("mlruns/*/meta.yaml"))  # no file store: MLflow's default stays sqlite
    # the docs' read-back snippet as written, then our checks, in one fresh interpreter (one MLflow
    # import instead of two; the snippet first, so it relies on nothing ours imports or sets): no
    # tracking URI, no env var, from where the sweep ran
    page = (ROOT / "docs" / "tracking.md").read_text()  # the documentation's read-back snippet
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "mlflow.search_runs" in b)
    read = subprocess.run([sys.executable, "-c", snippet + "\nprint('OUR CHECKS')\n" + READ_BACK], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert read.returncode == 0, read.stderr[-3000:]
    shown, ours = read.stdout.split("OUR CHECKS\n")
    lines = dict(line.split(" ", 1) for line in ours.splitlines() if line[:4] in ("URI ", "RUNS", "CLIE"))
    assert lines["URI"] == store  # MLflow's own default (sqlite:///mlflow.db, made absolute), with no setting
    runs = json.loads(lines["RUNS"])
    parents = [r for r in runs if not r["tags.mlflow.parentRunId"]]
    children = [r for r in runs if r["tags.mlflow.parentRunId"]]
    assert len(parents) == 1 and len(children) == 2 and lines["CLIENT"] == "3"
    assert {c["tags.mlflow.parentRunId"] for c in children} == {parents[0]["run_id"]}
    assert sorted(c["params.method.name"] for c in children) == ["bitfit", "heads"]
    assert all(c["status"] == "FINISHED" and c["metrics.params.trainable"] > 0 for c in children)
    assert {run_id for _, run_id, _ in said} == {r["run_id"] for r in runs}
    # the docs' snippet works as written
    assert "heads" in shown and "bitfit" in shown and "FINISHED" in shown
    # every column whole, the mask AP of each member a number (not pandas' "..." for a wide frame)
    assert "..." not in shown and "mask AP" in shown.splitlines()[0]
    for method in ("heads", "bitfit"):
        (row,) = [line for line in shown.splitlines() if f" {method} " in line]
        *_, status, shown_method, mask_ap, box_ap, ratio = row.split()
        assert (status, shown_method) == ("FINISHED", method) and 0 <= float(mask_ap) <= 100
        assert 0 <= float(box_ap) <= 100 and 0 < float(ratio) <= 1
    # artifacts beside the database, under ./mlruns (git-ignored with it)
    assert list(tmp_path.glob("mlruns/*/*/artifacts/results.json"))
    ignored = subprocess.run(["git", "check-ignore", "mlflow.db", "mlruns/", "search.db", "search/"], cwd=ROOT,
                             capture_output=True, text=True)
    assert ignored.stdout.split() == ["mlflow.db", "mlruns/", "search.db", "search/"]


def test_a_failed_member_is_logged_failed_with_its_error(tmp_path):
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.types import RunMode

    from peftseg.experiments.tracking import MlflowTracker

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
