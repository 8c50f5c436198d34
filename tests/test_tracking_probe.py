"""External services fail fast (issue 18, invariant 6): a tracking server that refuses or never
answers is found at the start in seconds, gives one warning, and the run's hooks do not stall."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from omegaconf import OmegaConf

from peftseg.engine import tracking


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server():
    """A port that accepts connections (the kernel's backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s.getsockname()[1]
    s.close()


def job_config(run_dir):
    from hydra.types import RunMode

    return OmegaConf.create({"model": {"name": "vitdet_tiny"}, "method": {"name": "lora"},
                             "hydra": {"mode": RunMode.RUN, "runtime": {"output_dir": str(run_dir)}}})


def run_callbacks(uri: str, run_dir) -> float:
    from hydra.core.utils import JobReturn, JobStatus

    tracker = tracking.MlflowTracker(uri=uri)
    start = time.monotonic()
    tracker.on_run_start(job_config(run_dir))
    ret = JobReturn()
    ret.status = JobStatus.COMPLETED
    tracker.on_job_end(job_config(run_dir), ret)
    return time.monotonic() - start


@pytest.mark.parametrize("server", ["closed", "silent"])
def test_a_dead_tracking_server_is_one_warning_and_no_stall(tmp_path, caplog, monkeypatch, server, request):
    monkeypatch.setattr(tracking, "PROBE_TIMEOUT_S", 1.0)
    for key in tracking._HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    port = closed_port() if server == "closed" else request.getfixturevalue("silent_server")
    uri = f"http://127.0.0.1:{port}"
    with caplog.at_level(logging.WARNING, logger="peftseg.engine.tracking"):
        elapsed = run_callbacks(uri, tmp_path)
    assert elapsed < 5, f"the tracking hooks took {elapsed:.1f} s against a {server} server"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    reason = "no answer within 1 s" if server == "silent" else "Connection refused"
    assert f"MLflow tracking server {uri} is unreachable (" in warnings[0] and reason in warnings[0]
    assert "this run is not tracked" in warnings[0]


def test_mlflow_http_retries_are_short_unless_the_user_set_them(monkeypatch):
    import os

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    tracking.tracking_uri("http://127.0.0.1:5000")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"  # the user's own value stays


def test_a_local_store_is_not_probed(tmp_path):
    assert tracking.probe((tmp_path / "mlruns").as_uri()) is None
    assert tracking.probe("sqlite:///mlflow.db") is None
