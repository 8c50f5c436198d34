"""External services fail fast: a tracking server that refuses or never answers is found at
the start in seconds, gives one warning, and the run's hooks do not stall; a local store
another process holds locked is one line at once and a bounded wait."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import HeldSqlite
from peftseg.experiments import tracking


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
    with caplog.at_level(logging.WARNING, logger="peftseg.experiments.tracking"):
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


def _unwritable(kind: str, tmp_path) -> str:
    """A tracking.uri MLflow could not write: under a file, in a read-only folder."""
    (tmp_path / "afile").write_text("not a folder")
    if kind == "sqlite under a file":
        return f"sqlite:///{tmp_path}/afile/mlflow.db"
    if kind == "file store under a file":
        return str(tmp_path / "afile" / "mlruns")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:  # root writes into a 0o555 folder: use sysfs, which refuses new files to anyone
        (ro / "probe").touch()
        (ro / "probe").unlink()
        ro = Path("/sys")
    except OSError:
        pass
    if tracking.store_problem(f"sqlite:///{ro}/mlflow.db") is None:
        pytest.skip("no read-only folder on this machine")
    return f"sqlite:///{ro}/mlflow.db" if kind == "sqlite in a read-only folder" else f"file://{ro}/mlruns"


@pytest.mark.parametrize("kind", ["sqlite under a file", "file store under a file", "sqlite in a read-only folder",
                                  "file store in a read-only folder"])
def test_an_unwritable_store_is_refused_before_the_run_or_sweep(tmp_path, kind):
    from peftseg.errors import UserErrorExit

    uri = _unwritable(kind, tmp_path)
    for hook in ("on_run_start", "on_multirun_start"):  # Hydra would warn about an Exception and train on
        with pytest.raises(UserErrorExit) as refused:
            getattr(tracking.MlflowTracker(uri=uri), hook)(job_config(tmp_path))
        message = str(refused.value.error)
        assert message.startswith(f"tracking.uri={uri}: the MLflow store cannot be written: ")
        assert ("is a file" in message) == ("under a file" in kind), message
        assert "Nothing was run" in message and "tracking.uri=sqlite:///$PWD/mlflow.db" in message
    assert tracking.store_problem(f"sqlite:///{tmp_path}/new/dir/mlflow.db") is None  # MLflow creates folders
    assert tracking.store_problem(str(tmp_path / "mlruns")) is None
    assert tracking.store_problem("http://127.0.0.1:5000") is None  # a server: probed, not written


def test_train_and_search_refuse_an_unwritable_store_with_exit_2(peftseg, tmp_path, shapes_cache):
    from helpers import cli_in_process

    uri = _unwritable("sqlite under a file", tmp_path)
    proc = peftseg("train", "+tracking=mlflow", f"tracking.uri={uri}", "train=smoke", "train.max_iter=2",
                   "train.warmup_iters=0", timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: tracking.uri=" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "outputs").exists()  # refused before Hydra made the run dir
    proc = cli_in_process("search", "+tracking=mlflow", f"tracking.uri={uri}", "search.n_trials=1",
                          f"search.storage=sqlite:///{tmp_path}/study.db", cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 2 and "the MLflow store cannot be written" in proc.stderr, proc.stderr
    assert not (tmp_path / "study.db").exists()  # before the study was opened


def test_a_locked_mlflow_db_is_one_line_at_once_then_a_bounded_wait(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    held = HeldSqlite(tmp_path / "mlflow.db")
    said = []

    def say(line):  # said before the wait: the lock goes only once the line is out
        said.append(line)
        held.release()

    tracker = tracking.MlflowTracker(uri=uri)
    tracker.start(say)
    assert said == [f"mlflow: the store {uri} is locked by another process (database is locked); waiting up to "
                    f"{tracking.STORE_WAIT_S:g} s for it to be released"]
    parent = tracker.start_parent("after the wait", {}, {"a": 1})  # the store is usable once released
    assert tracker.client().get_run(parent).data.params == {"a": "1"}
    assert tracking.sqlite_busy(tmp_path / "mlflow.db", 0.0) is None
    assert tracking.sqlite_busy(tmp_path / "absent.db", 0.0) is None  # nothing to wait for


def test_a_mlflow_db_held_past_the_wait_is_refused_before_the_run_or_search(tmp_path, monkeypatch, shapes_cache,
                                                                            caplog):
    from helpers import cli_in_process
    from peftseg.errors import UserErrorExit

    monkeypatch.setattr(tracking, "STORE_WAIT_S", 0.2)
    monkeypatch.setattr(tracking, "BUSY_PROBE_S", 0.0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    held = HeldSqlite(tmp_path / "mlflow.db")
    try:
        with caplog.at_level(logging.WARNING, logger="peftseg.experiments.tracking"), pytest.raises(UserErrorExit) as refused:
            tracking.MlflowTracker(uri=uri).on_run_start(job_config(tmp_path))  # train: before Hydra trains
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        line = (f"mlflow: the store {uri} is locked by another process (database is locked); waiting up to 0.2 s "
                "for it to be released")
        assert warnings == [line]
        assert str(refused.value.error) == (
            f"tracking.uri={uri}: the MLflow store is still locked by another process after 0.2 s (database is "
            "locked). Nothing was run. Close what holds it (an open transaction in a sqlite3 shell or a database "
            "browser, a process that is stuck writing), point tracking.uri at another store, or leave out "
            "+tracking=mlflow.")
        proc = cli_in_process("search", "+tracking=mlflow", f"tracking.uri={uri}", "search.n_trials=1",
                              f"search.storage=sqlite:///{tmp_path}/study.db", cwd=tmp_path, cache=shapes_cache)
    finally:
        held.release()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [line]  # said at once, on the search's console
    assert proc.stderr.startswith(f"error: tracking.uri={uri}: the MLflow store is still locked by another process")
    assert not (tmp_path / "study.db").exists()  # before the study was opened


def test_a_mlflow_db_locked_when_a_run_ends_is_said_at_once_and_the_run_left_untracked(tmp_path, monkeypatch,
                                                                                       caplog):
    from hydra.core.utils import JobReturn, JobStatus

    monkeypatch.setattr(tracking, "STORE_WAIT_S", 0.2)
    monkeypatch.setattr(tracking, "BUSY_PROBE_S", 0.0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = tracking.MlflowTracker(uri=uri)
    tracker.start()  # free at the start
    held = HeldSqlite(tmp_path / "mlflow.db")  # and held when the run ends
    ret = JobReturn()
    ret.status = JobStatus.COMPLETED
    try:
        with caplog.at_level(logging.WARNING, logger="peftseg.experiments.tracking"):
            tracker.on_job_end(job_config(tmp_path), ret)
    finally:
        held.release()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"mlflow: the store {uri} is locked by another process (database is locked); waiting up to 0.2 s for it "
        "to be released",
        f"MLflow: {tmp_path} not tracked: its store is still locked by another process after 0.2 s (database is "
        "locked)"]
