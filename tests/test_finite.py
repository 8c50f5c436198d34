"""Invariant 1: a number that is not finite is never a result — through a run, `peftseg eval`
and `peftseg report` (each asks peftseg.finite; a test per surface, so breaking any one fails)."""

import io
import json
import math

import pytest
from detectron2.evaluation import DatasetEvaluator
from rich.console import Console

from helpers import cli_in_process, run_in_process
from peftseg.engine import evaluate as evaluate_module
from peftseg.errors import UserError
from peftseg.finite import metric_problems, result_problems, undefined_metrics
from peftseg.report import build_report
from peftseg.report.collect import front_ids, group_records, load_records

NAN, INF = float("nan"), float("inf")


def test_the_rule_tells_undefined_from_wrong():
    ok = {"segm": {"AP": 30.0, "AP50": 50.0, "AP75": 20.0, "APs": NAN, "AP-circle": NAN}, "bbox": {"AP": 31.0}}
    assert metric_problems(ok) == []  # COCOeval's "no ground truth in this area range / class"
    assert undefined_metrics(ok) == ["segm.APs", "segm.AP-circle"]
    assert metric_problems({"segm": {"AP": NAN}}) == ["segm.AP = NaN"]
    assert metric_problems({"segm": {"AP": 3.0, "APl": INF}}) == ["segm.APl = inf"]
    assert metric_problems({"bbox": {"AP": 3.0}}) == ["segm.AP is missing"]
    assert result_problems(ok, {"ratio": INF}, {"mean_step_time_s": -INF}) == [
        "params.ratio = inf", "efficiency.mean_step_time_s = -inf"]


class _Evaluator(DatasetEvaluator):
    """The dataset's evaluator giving the numbers a broken val json gives (e.g. `area: -1`)."""

    def __init__(self, numbers):
        self.numbers = numbers

    def reset(self):
        pass

    def process(self, inputs, outputs):
        pass

    def evaluate(self):
        return json.loads(json.dumps(self.numbers))  # a copy each time


def test_a_run_whose_evaluation_is_not_finite_is_failed_with_the_reason(tmp_path, shapes_cache, monkeypatch):
    # one real (2-step) run; the other non-finite shapes go through the same check_result (unit test above)
    numbers = {"segm": {"AP": NAN, "AP50": NAN, "AP75": NAN}, "bbox": {"AP": 10.0, "AP50": INF, "AP75": 5.0}}
    reason = "segm.AP = NaN"
    monkeypatch.setitem(evaluate_module.EVALUATORS, "coco", lambda name, out: _Evaluator(numbers))
    with pytest.raises(UserError, match="not a result"):
        run_in_process(tmp_path, shapes_cache, "train.max_iter=2", "train.warmup_iters=0", "train.num_workers=0")
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "failed"
    assert reason in record["error"]["message"] and "bbox.AP50 = inf" in record["error"]["message"]
    # the checkpoint trained: `peftseg eval` of it with the same evaluator refuses too, and says why in eval.json
    proc = cli_in_process("eval", f"checkpoint={tmp_path}", "output=again", cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert reason in proc.stderr and "Traceback" not in proc.stderr
    written = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert written["status"] == "failed" and reason in written["error"]


def _record(root, name, *, method="lora", ap=30.0, ratio=0.05, step=0.5, status="ok"):
    record = {
        "run": {"id": name, "dir": str(root / name), "start_time": "2024-01-01T00:00:00+00:00"},
        "config": {"model.name": "vitdet_tiny", "dataset.name": "shapes", "method.name": method},
        "params": {"total": 1000, "trainable": 50, "ratio": ratio},
        "metrics": {"segm": {"AP": ap, "AP50": 50.0}, "bbox": {"AP": 20.0}},
        "efficiency": {"mean_step_time_s": step, "peak_memory_bytes": 600, "peak_memory_kind": "cpu_peak_rss"},
        "status": status,
    }
    (root / name).mkdir(parents=True)
    # as another tool or an older peftseg writes it: Python's json writes NaN / Infinity literals
    (root / name / "results.json").write_text(json.dumps(record))


def test_report_never_shows_a_non_finite_record_as_ok_nor_on_the_front(tmp_path):
    _record(tmp_path, "full", method="full", ap=40.0, ratio=1.0, step=1.0)
    _record(tmp_path, "good", ap=35.0, ratio=0.05)
    _record(tmp_path, "nan_ap", ap=NAN, ratio=0.01)
    _record(tmp_path, "inf_ap", ap=INF, ratio=0.02)
    _record(tmp_path, "inf_ratio", ap=39.0, ratio=INF)  # the run that took the Pareto star before
    _record(tmp_path, "inf_step", ap=33.0, ratio=0.03, step=INF)
    out = io.StringIO()
    build_report(tmp_path, "full", Console(file=out, width=250))
    text = out.getvalue()
    with open(tmp_path / "report.csv", newline="") as f:
        import csv

        rows = {row["run.id"]: row for row in csv.DictReader(f)}
    for name, reason in (("nan_ap", "metrics.segm.AP = NaN"), ("inf_ap", "metrics.segm.AP = inf"),
                         ("inf_ratio", "params.ratio = inf"), ("inf_step", "efficiency.mean_step_time_s = inf")):
        assert rows[name]["status"] == "invalid", name
        assert reason.removeprefix("metrics.") in rows[name]["error.message"], rows[name]["error.message"]
        assert rows[name]["baseline.delta_mask_AP"] in ("", None)
        assert reason.removeprefix("metrics.") in text
    for name in ("full", "good"):
        assert rows[name]["status"] == "ok"
    assert float(rows["good"]["baseline.delta_mask_AP"]) == pytest.approx(-5.0)
    assert "nan" not in text.lower().replace("nan_ap", "").replace("= nan", "")
    assert "inf " not in text and "inf│" not in text
    (group,) = group_records(load_records(tmp_path))
    front = {r.run.id for r in group.records if id(r) in front_ids(group)}
    assert front == {"good", "full"}
    assert all(math.isfinite(v) for r in group.records for v in (r.metrics or {}).get("segm", {}).values()
               if v is not None)
