import json
import re
import math
import os

import pytest

from peftseg.io.atomic import write_atomic
from peftseg.results import (
    SCHEMA_VERSION,
    Record,
    RunInfo,
    evaluator_metrics,
    read_record,
    versions,
    write_record,
)


def _record(**kw) -> Record:
    return Record(run=RunInfo(id="r", dir="/tmp/r", start_time="2026-01-01T00:00:00+00:00"),
                  config={"method.name": "lora"}, **kw)


def test_record_round_trips_and_nan_becomes_null(tmp_path):
    record = _record(status="ok", metrics={"segm": {"AP": 12.5, "APl": math.nan}})
    path = write_record(tmp_path, record)
    assert path.name == "results.json"
    back = read_record(tmp_path)
    assert back.metrics == {"segm": {"AP": 12.5, "APl": None}}
    assert back.mask_ap == 12.5 and back.box_ap is None and back.ok
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION == 2
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_version_1_records_still_read_and_foreign_json_is_refused(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(
        {"run": {"id": "old", "dir": "d", "start_time": "t"}, "config": {}, "status": "ok",
         "metrics": {"segm": {"AP": 3.0}}}))
    old = read_record(tmp_path)
    assert old.schema_version == 1 and old.mask_ap == 3.0
    (tmp_path / "results.json").write_text(json.dumps({"status": "ok"}))
    with pytest.raises(ValueError, match="not a peftseg run record"):
        read_record(tmp_path)


def test_versions_name_the_whole_stack():
    assert set(versions()) == {"python", "torch", "torchvision", "detectron2", "peft", "transformers",
                               "timm", "hydra", "peftseg", "lock"}
    assert all(v and v != "not installed" for v in versions().values())
    # set up by scripts/setup.sh: the environment is exactly the committed lock, named by its hash
    assert re.fullmatch(r"[0-9a-f]{16}", versions()["lock"]), versions()["lock"]


def test_failed_write_keeps_previous_content_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    write_atomic(target, b'{"status": "ok"}')

    def boom(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_atomic(target, b"{half")
    assert json.loads(target.read_text()) == {"status": "ok"}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_evaluator_metrics_keep_everything_segm_first():
    raw = {"bbox": {"AP": 4.0}, "segm": {"AP": 1.0, "AP50": 2.0, "AP-circle": 3.0}}
    out = evaluator_metrics(raw)
    assert list(out) == ["segm", "bbox"]
    assert out["segm"] == {"AP": 1.0, "AP50": 2.0, "AP-circle": 3.0}
