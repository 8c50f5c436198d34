"""Invariant 1: a number that is not finite, or outside its range (AP in [0, 100], a ratio in
(0, 1], times and sizes > 0), is never a result — through a run, `peftseg eval`, the record's
writer and `peftseg report` (each asks peftseg.finite; a test per surface, so breaking any one
fails). COCOeval's -1 ("undefined") is never stored: null with the reason, or a failure."""

import io
import json
import math

import pytest
from detectron2.evaluation import DatasetEvaluator
from rich.console import Console

from helpers import cli_in_process, run_in_process
from peftseg.engine import evaluate as evaluate_module
from peftseg.errors import UserError
from peftseg.finite import check_result, metric_problems, result_problems, undefined_metrics
from peftseg.report import build_report
from peftseg.report.collect import front_ids, group_records, load_records
from peftseg.results import Record, RunInfo, read_record, write_record

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


def test_every_number_is_checked_against_its_range():
    metrics = {"segm": {"AP": 30.0, "AP50": 100.0, "AP75": 0.0, "APs": -1.0, "APm": -0.5, "AP-circle": 130.0},
               "cityscapes": {"AP": 101.0, "AP50": 50}}
    assert metric_problems(metrics) == [
        "segm.APm = -0.5, outside [0, 100]", "segm.AP-circle = 130.0, outside [0, 100]",
        "cityscapes.AP = 101.0, outside [0, 100]"]  # APs = -1: COCOeval's "undefined", not a problem
    for headline in ("AP", "AP50", "AP75"):  # -1 or null where an evaluator must give a number
        assert metric_problems({"segm": {"AP": 1.0, headline: -1}}) == [
            f"segm.{headline} = -1 (COCOeval's 'undefined': nothing to score)"]
        assert metric_problems({"segm": {"AP": 1.0, headline: None}}) == [f"segm.{headline} is missing"]
    params = {"total": 1000, "trainable": 1001, "ratio": 0.0, "by_group": {"backbone": {"total": -1, "trainable": 2.5}}}
    assert result_problems({"segm": {"AP": 1.0}}, params) == [
        "params.ratio = 0.0, outside (0, 1]", "params.by_group.backbone.total = -1, not a count (a whole number >= 0)",
        "params.by_group.backbone.trainable = 2.5, not a count (a whole number >= 0)",
        "params.trainable = 1001 > params.total = 1000"]
    assert result_problems({"segm": {"AP": 1.0}}, {"total": 10, "trainable": 10, "ratio": 1.0000001}) == [
        "params.ratio = 1.0000001, outside (0, 1]"]
    efficiency = {"device": "cpu", "mean_step_time_s": 0.0, "images_per_s": -3.0, "train_wall_time_s": 1e-9,
                  "peak_memory_bytes": 0, "checkpoint_bytes": None, "timed_steps": 0, "num_processes": 0,
                  "checkpointed_blocks": 1.5, "run_wall_time_s": 2.0}
    assert result_problems({"segm": {"AP": 1.0}}, efficiency=efficiency) == [
        "efficiency.mean_step_time_s = 0.0, not > 0", "efficiency.images_per_s = -3.0, not > 0",
        "efficiency.peak_memory_bytes = 0, not > 0", "efficiency.num_processes = 0, not a whole number >= 1",
        "efficiency.checkpointed_blocks = 1.5, not a whole number >= 0"]


def test_undefined_entries_are_stored_null_with_the_reason_and_a_range_error_fails():
    metrics = {"segm": {"AP": 30.0, "AP50": 50.0, "AP75": 20.0, "APs": -1.0, "APl": NAN, "AP-circle": -1.0},
               "bbox": {"AP": 31.0, "APs": NAN}}
    notes = check_result(metrics, "evaluation", "this run has")
    assert metrics == {"segm": {"AP": 30.0, "AP50": 50.0, "AP75": 20.0, "APs": None, "APl": None, "AP-circle": None},
                       "bbox": {"AP": 31.0, "APs": None}}  # never -1
    assert notes == {
        "APs/APm/APl recorded as null: the val split has no instance of that size (segm.APs, segm.APl, bbox.APs)": 3,
        "per-class AP recorded as null: the val split has no instance of that class (segm.AP-circle)": 1}
    dotted = {"segm": {"AP": 3.0, "AP-st. bernard": NAN}}  # a class name with a dot is still a class
    assert check_result(dotted, "evaluation", "this run has") == {
        "per-class AP recorded as null: the val split has no instance of that class (segm.AP-st. bernard)": 1}
    with pytest.raises(UserError) as e:
        check_result({"segm": {"AP": -1.0, "AP50": 250.0}}, "evaluation on 'val'", "this run has")
    assert str(e.value).startswith(
        "evaluation on 'val' gave numbers that are not a result (segm.AP = -1 (COCOeval's 'undefined': nothing "
        "to score); segm.AP50 = 250.0, outside [0, 100]), so this run has no result to record.")


def test_the_writer_never_writes_ok_with_numbers_out_of_range(tmp_path):
    record = Record(run=RunInfo(id="r", dir=str(tmp_path), start_time="t"), config={}, status="ok",
                    metrics={"segm": {"AP": 130.0}}, params={"total": 10, "trainable": 1, "ratio": 0.1})
    write_record(tmp_path, record)
    stored = read_record(tmp_path)
    assert stored.status == "failed" and stored.error["type"] == "UserError"
    assert "(segm.AP = 130.0, outside [0, 100])" in stored.error["message"]
    record.status, record.metrics = "pruned", {"segm": {"AP": -1, "AP50": 3.0, "APs": -1.0}}
    write_record(tmp_path, record)  # -1 is never stored, whatever the status
    assert json.loads((tmp_path / "results.json").read_text())["metrics"] == {
        "segm": {"AP": None, "AP50": 3.0, "APs": None}}


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
    numbers = {"segm": {"AP": NAN, "AP50": NAN, "AP75": NAN}, "bbox": {"AP": 10.0, "AP50": INF, "AP75": 130.0}}
    reason = "segm.AP = NaN"
    monkeypatch.setitem(evaluate_module.EVALUATORS, "coco", lambda name, out: _Evaluator(numbers))
    with pytest.raises(UserError, match="not a result"):
        run_in_process(tmp_path, shapes_cache, "train.max_iter=2", "train.warmup_iters=0", "train.num_workers=0")
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "failed"
    assert reason in record["error"]["message"] and "bbox.AP50 = inf" in record["error"]["message"]
    assert "bbox.AP75 = 130.0, outside [0, 100]" in record["error"]["message"]
    # the checkpoint trained: `peftseg eval` of it with the same evaluator refuses too, and says why in eval.json
    proc = cli_in_process("eval", f"checkpoint={tmp_path}", "output=again", cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert reason in proc.stderr and "Traceback" not in proc.stderr
    written = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert written["status"] == "failed" and reason in written["error"]


def test_a_run_stores_an_undefined_size_or_class_ap_as_null_with_the_reason(tmp_path, shapes_cache, monkeypatch):
    numbers = {"segm": {"AP": 12.0, "AP50": 20.0, "AP75": 10.0, "APs": -1.0, "APm": 12.0, "APl": NAN,
                        "AP-circle": 12.0}, "bbox": {"AP": 14.0, "AP50": 22.0, "AP75": 11.0, "APs": -1.0}}
    monkeypatch.setitem(evaluate_module.EVALUATORS, "coco", lambda name, out: _Evaluator(numbers))
    record = run_in_process(tmp_path, shapes_cache, "train.max_iter=2", "train.warmup_iters=0", "train.num_workers=0")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert record.ok and saved["status"] == "ok"
    assert saved["metrics"]["segm"] == {"AP": 12.0, "AP50": 20.0, "AP75": 10.0, "APs": None, "APm": 12.0,
                                        "APl": None, "AP-circle": 12.0}
    assert saved["metrics"]["bbox"]["APs"] is None
    assert saved["data_notes"]["val"] == {
        "APs/APm/APl recorded as null: the val split has no instance of that size (segm.APs, segm.APl, bbox.APs)": 3}


def _record(root, name, *, method="lora", ap=30.0, ratio=0.05, step=0.5, status="ok", mem=600, aps=10.0):
    record = {
        "run": {"id": name, "dir": str(root / name), "start_time": "2024-01-01T00:00:00+00:00"},
        "config": {"model.name": "vitdet_tiny", "dataset.name": "shapes", "method.name": method},
        "params": {"total": 1000, "trainable": 50, "ratio": ratio},
        "metrics": {"segm": {"AP": ap, "AP50": 50.0, "APs": aps}, "bbox": {"AP": 20.0}},
        "efficiency": {"mean_step_time_s": step, "peak_memory_bytes": mem, "peak_memory_kind": "cpu_peak_rss"},
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


def test_report_shows_a_record_with_numbers_out_of_range_as_invalid(tmp_path):
    _record(tmp_path, "full", method="full", ap=40.0, ratio=1.0, step=1.0)
    _record(tmp_path, "good", ap=35.0, ratio=0.05, aps=-1.0)  # COCOeval's "no small objects": a dash, still ok
    _record(tmp_path, "minus_one_ap", ap=-1.0, ratio=0.01)  # COCOeval's "undefined" as the headline
    _record(tmp_path, "big_ap", ap=130.0, ratio=0.02)  # would have taken the Pareto star
    _record(tmp_path, "zero_ratio", ap=38.0, ratio=0.0)
    _record(tmp_path, "ratio_above_one", ap=38.0, ratio=1.5)
    _record(tmp_path, "zero_step", ap=33.0, ratio=0.03, step=0.0)
    _record(tmp_path, "negative_memory", ap=33.0, ratio=0.03, mem=-600)
    _record(tmp_path, "pruned", ap=-1.0, ratio=0.03, status="pruned")  # another tool's -1: shown as null
    out = io.StringIO()
    build_report(tmp_path, "full", Console(file=out, width=250))
    text = out.getvalue()
    with open(tmp_path / "report.csv", newline="") as f:
        import csv

        rows = {row["run.id"]: row for row in csv.DictReader(f)}
    for name, reason in (("minus_one_ap", "segm.AP = -1 (COCOeval's 'undefined': nothing to score)"),
                         ("big_ap", "segm.AP = 130.0, outside [0, 100]"),
                         ("zero_ratio", "params.ratio = 0.0, outside (0, 1]"),
                         ("ratio_above_one", "params.ratio = 1.5, outside (0, 1]"),
                         ("zero_step", "efficiency.mean_step_time_s = 0.0, not > 0"),
                         ("negative_memory", "efficiency.peak_memory_bytes = -600, not > 0")):
        assert rows[name]["status"] == "invalid", name
        assert rows[name]["error.message"] == f"recorded ok, but its numbers are not a result: {reason}"
        assert rows[name]["baseline.delta_mask_AP"] in ("", None)
        assert reason in text
    assert rows["big_ap"]["metrics.segm.AP"] == "" and rows["zero_ratio"]["params.ratio"] == ""
    assert rows["good"]["status"] == "ok" and rows["good"]["metrics.segm.APs"] == ""  # not -1
    assert rows["full"]["metrics.segm.APs"] == "10.0"
    assert rows["pruned"]["status"] == "pruned" and rows["pruned"]["metrics.segm.AP"] == ""
    assert float(rows["good"]["baseline.delta_mask_AP"]) == pytest.approx(-5.0)
    (group,) = group_records(load_records(tmp_path))
    assert {r.run.id for r in group.records if id(r) in front_ids(group)} == {"good", "full"}
