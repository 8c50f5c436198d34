import json
import math
import os

import pytest

from peftseg.results import coco_metrics, read_record, write_atomic, write_record


def test_record_round_trips_and_nan_becomes_null(tmp_path):
    record = {"status": "ok", "metrics": {"segm": {"AP": 12.5, "APl": math.nan}}}
    path = write_record(tmp_path, record)
    assert path.name == "results.json"
    assert read_record(tmp_path) == {"status": "ok", "metrics": {"segm": {"AP": 12.5, "APl": None}}}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


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


def test_coco_metrics_keeps_summary_keys():
    raw = {"segm": {"AP": 1.0, "AP50": 2.0, "AP-circle": 3.0}, "bbox": {"AP": 4.0}}
    assert coco_metrics(raw) == {"segm": {"AP": 1.0, "AP50": 2.0}, "bbox": {"AP": 4.0}}
