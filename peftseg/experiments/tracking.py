"""MLflow tracking as a Hydra callback: `peftseg train +tracking=mlflow …`.

The default store is MLflow's own default local backend since 3.7, `sqlite:///mlflow.db`
in the working directory (artifacts under ./mlruns/<experiment>/<run>/artifacts), so
`mlflow ui` and `mlflow.search_runs()` run there find what peftseg logged, with no
setting. A file store (`tracking.uri=./mlruns`, MLflow 3's maintenance-mode backend) still
works when named explicitly.

Each run becomes an MLflow run: its flattened config as params, the record's metrics,
parameter counts and efficiency numbers as metrics, the training curves per iteration
(from metrics.json), and results.json, the final checkpoint and the Hydra config as
artifacts. A sweep (-m) becomes a parent run with one child per member, and the parent
gets the sweep's report (report.md, report.csv, pictures) at the end. A member that fails
is logged with status FAILED and its error as tags.

The callback talks to MLflow through `MlflowClient` with explicit run ids, not the
fluent `mlflow.start_run` stack: sweep members may run in other processes (submitit,
SLURM), which find the parent's id in the sweep dir.

Light module: mlflow is imported when a callback method runs, so `import peftseg.experiments.tracking`
(Hydra resolving `_target_`) costs nothing when tracking is off.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from peftseg.errors import UserError, UserErrorExit

log = logging.getLogger(__name__)

PARENT_FILE = ".mlflow_parent_run"  # in the sweep dir: the parent run's id for members elsewhere
ARTIFACTS = ("results.json", "model_final.safetensors", "peft/adapter_config.json", "peft/adapter_model.safetensors",
             "peft/trained_outside_peft.safetensors", "peft/heads.safetensors", ".hydra/config.yaml", ".hydra/overrides.yaml")
_BATCH = 100  # MlflowClient.log_batch takes at most 100 params (and 1000 metrics) per call


PROBE_TIMEOUT_S = 5.0  # the start-of-run check of a tracking server
# MLflow's HTTP client retries a failed request 7 times with a doubling backoff, each attempt
# waiting up to 120 s: a dead server stalled the end of a run for minutes (never-answering:
# 8 minutes and counting). A few short tries instead; a user's own setting wins.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def probe(uri: str, timeout: float | None = None) -> str | None:
    """Why the tracking server at `uri` cannot be used, or None (it answers, or `uri` is not a
    server). MLflow's server answers GET /health; any HTTP answer (a proxy's 404, a 401) means
    something is listening, and MLflow's own calls will say what is wrong with it."""
    import socket
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return None
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            response.read(64)
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, socket.timeout)):
            return f"no answer within {timeout:g} s"
        return str(e.reason)
    except (TimeoutError, socket.timeout):
        return f"no answer within {timeout:g} s"
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _local_store(uri: str) -> tuple[Path, bool] | None:
    """(path, is a sqlite file) of a store MLflow keeps on this machine's disk; None for a server
    or a database elsewhere."""
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///"):].split("?", 1)[0]  # sqlite:////abs/m.db -> /abs/m.db
        return (Path(rest), True) if rest not in ("", ":memory:") else None
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path)), False
    return (Path(uri), False) if "://" not in uri else None


def store_problem(uri: str) -> str | None:
    """Why MLflow could not write the local store `uri` (a sqlite file or a file store folder),
    or None (a server is probed instead). Left unchecked, an unwritable store failed after the
    run, with minutes of SQLAlchemy retries."""
    from peftseg.io.output_guard import unwritable

    local = _local_store(uri)
    return None if local is None else unwritable(local[0], "file" if local[1] else "folder")


DEFAULT_DB = "mlflow.db"  # MLflow's default local backend (sqlite:///mlflow.db) since 3.7


# --- a local sqlite store another process holds -----------------------------------------------
# MLflow's sessions wait up to 20 s per statement for a locked sqlite file (PRAGMA busy_timeout),
# and a run makes several: a store held by another process (a sqlite3 shell in a transaction, a
# stuck writer) left a run silent for over a minute before it failed. Optuna's sqlite storage
# fails after pysqlite's 5 s. So a run looks first, says at once that it waits and how long,
# and waits that long at most; the search's own sqlite storage gets the same.
STORE_WAIT_S = 60.0  # how long a run waits for a sqlite store that another process holds
BUSY_PROBE_S = 1.0  # a write lock held this long is not another worker's moment of writing


def sqlite_file(uri: str) -> Path | None:
    """The local sqlite file behind an SQLAlchemy URL, or None (another kind of store)."""
    local = _local_store(uri) if uri.startswith("sqlite:///") else None
    return local[0] if local else None


def sqlite_busy(path: Path, timeout: float) -> str | None:
    """Why a write to the sqlite database `path` cannot start within `timeout` s (another
    connection holds a lock on it: a writer, or a reader a writer would wait for), or None.
    SQLite's own busy handler does the waiting (the timeout of sqlite3.connect); nothing is
    written: the exclusive transaction is rolled back at once."""
    import sqlite3

    if not path.is_file():
        return None
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=timeout, isolation_level=None)
    except sqlite3.Error:  # not openable for writing: the store's own checks say why
        return None
    try:
        con.execute("BEGIN EXCLUSIVE")
        con.execute("ROLLBACK")
        return None
    except sqlite3.OperationalError as e:
        return str(e) if "locked" in str(e) or "busy" in str(e) else None
    finally:
        con.close()


def wait_for_sqlite(path: Path, what: str, say, wait_s: float | None = None) -> str | None:
    """Wait for a sqlite store that another process holds: one line through `say` as soon as
    it is found held (what, and how long this run waits), then up to `wait_s` s. None when it
    is free (at once, or within the wait); otherwise why it is still held."""
    wait_s = STORE_WAIT_S if wait_s is None else wait_s
    busy = sqlite_busy(path, BUSY_PROBE_S)
    if busy is None:
        return None
    say(f"{what} is locked by another process ({busy}); waiting up to {wait_s:g} s for it to be released")
    return sqlite_busy(path, wait_s)


def tracking_uri(uri: str) -> str:
    """The store to log to. The default database is named by its absolute path: sweep members
    (other processes, SLURM jobs) must reach the same file whatever their working directory."""
    if not uri:
        return "sqlite:///" + str(Path(DEFAULT_DB).resolve())
    if uri.startswith(("http://", "https://")):
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
    if uri.startswith("file:") or "://" not in uri:
        # a file store named explicitly (e.g. an existing ./mlruns): MLflow 3 keeps it in
        # maintenance mode and refuses it unless asked; the user asked for it by name
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def _metric_key(key: str) -> str:
    # MLflow accepts letters, digits, _ - . space / in names
    return re.sub(r"[^\w\-. /]", "_", key)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def record_metrics(record: dict) -> dict[str, float]:
    """Numbers of a run record worth a metric: COCO AP, parameter counts, efficiency."""
    out: dict[str, float] = {}

    def walk(prefix: str, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif (number := _number(value)) is not None:
            out[_metric_key(prefix)] = number

    for section in ("metrics", "params", "efficiency"):
        walk(section, record.get(section) or {})
    return out


def curve_points(run_dir: Path) -> list[tuple[str, float, int]]:
    """(key, value, iteration) of every number detectron2's JSONWriter logged during training."""
    from peftseg.io.training_log import read_training_log

    points = []
    for _, row in read_training_log(run_dir):
        for key, value in row.items():
            number = _number(value)
            if key != "iteration" and number is not None:
                points.append((_metric_key(f"train/{key}"), number, row["iteration"]))
    return points


class MlflowTracker(Callback):
    def __init__(self, uri: str = "", experiment: str = "peftseg") -> None:
        self.uri, self.experiment = uri, experiment
        self._parent: str | None = None
        self._sweep_start = ""  # when the sweep this callback runs in started (its records are newer)
        self._client = None
        self._unreachable: str | None = None
        self._probed = False
        self._started = False

    def check_store(self) -> None:
        """UserError if the store is local and cannot be written: at the start, before anything
        trains, instead of a failure (and minutes of retries) after the run."""
        uri = tracking_uri(self.uri)
        problem = store_problem(uri)
        if problem:
            given = (f"tracking.uri={self.uri}" if self.uri else
                     f"+tracking=mlflow with no tracking.uri (MLflow's default store {uri})")
            raise UserError(
                f"{given}: the MLflow store cannot be written: {problem}. Nothing was run. Point "
                f"tracking.uri at a writable place (e.g. tracking.uri=sqlite:///$PWD/mlflow.db, or a server: "
                f"tracking.uri=http://host:5000), make that folder writable, or leave out +tracking=mlflow.")

    def start(self, say=None) -> None:
        """The start of a run, a sweep or a search: refuse a store that cannot be written (one
        paragraph, exit 2), wait for a sqlite store another process holds (one line through
        `say` at once, then STORE_WAIT_S at most; still held: one paragraph, exit 2), and probe
        a server (a dead one: one warning), once per process."""
        if not self._started:
            self._started = True
            self.check_store()
            self.check_lock(say or log.warning)
            self.available()

    def wait_for_store(self, say) -> str | None:
        """A sqlite store another process holds: one line through `say`, then STORE_WAIT_S at
        most; None when it is free, otherwise why it is still held."""
        uri = tracking_uri(self.uri)
        path = sqlite_file(uri)
        return None if path is None else wait_for_sqlite(path, f"mlflow: the store {uri}", say)

    def check_lock(self, say) -> None:
        held = self.wait_for_store(say)
        if held:
            uri = tracking_uri(self.uri)
            given = f"tracking.uri={self.uri}" if self.uri else f"+tracking=mlflow (MLflow's default store {uri})"
            raise UserError(
                f"{given}: the MLflow store is still locked by another process after {STORE_WAIT_S:g} s ({held}). "
                "Nothing was run. Close what holds it (an open transaction in a sqlite3 shell or a database "
                "browser, a process that is stuck writing), point tracking.uri at another store, or leave out "
                "+tracking=mlflow.")

    def available(self) -> bool:
        """Probe the tracking server once (seconds): a dead one is one warning, and this
        callback does nothing more; the run itself goes on untracked."""
        if not self._probed:
            self._probed = True
            uri = tracking_uri(self.uri)
            self._unreachable = probe(uri)
            if self._unreachable:
                log.warning("MLflow tracking server %s is unreachable (%s): this run is not tracked (its record "
                            "and files are written as usual). Start the server, point tracking.uri at a "
                            "running one, or leave out +tracking=mlflow.", uri, self._unreachable)
        return self._unreachable is None

    # -- MLflow plumbing ------------------------------------------------------------------

    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=tracking_uri(self.uri))
        return self._client

    def experiment_id(self) -> str:
        client = self.client()
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(self.experiment)
        except Exception:  # a sweep member in another process created it first
            return client.get_experiment_by_name(self.experiment).experiment_id

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client().log_batch(run_id, params=items[i:i + _BATCH])

    def _log_metrics(self, run_id: str, points: list[tuple[str, float, int]]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v, step in points]
        for i in range(0, len(metrics), 1000):
            self.client().log_batch(run_id, metrics=metrics[i:i + 1000])

    # -- Hydra callback hooks -------------------------------------------------------------

    def store(self) -> str:
        return tracking_uri(self.uri)

    def announce(self, what: str, run_id: str) -> None:
        """Say where it logged: the store and the run id (what `mlflow ui` and the client need)."""
        print(f"mlflow: {what} {run_id} in {self.store()} (experiment {self.experiment!r})", flush=True)

    def start_parent(self, name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
        """A parent run (a sweep, a search study) the runs are logged under as children."""
        run = self.client().create_run(self.experiment_id(), run_name=name, tags=tags)
        self._log_params(run.info.run_id, params)
        self.announce("parent run", run.info.run_id)
        return run.info.run_id

    def _start_in_hydra(self) -> None:
        try:
            self.start()
        except UserError as exc:  # Hydra would turn it into a warning and train anyway
            raise UserErrorExit(exc) from None

    def on_run_start(self, config, **kwargs) -> None:
        self._start_in_hydra()  # at the start, not after the run

    def on_multirun_start(self, config, **kwargs) -> None:
        from peftseg.results import now

        self._sweep_start = now()  # the sweep's own records started after this
        self._start_in_hydra()  # before the first member
        if not self.available():
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        overrides = list(config.hydra.overrides.task)
        self._parent = self.start_parent(
            f"sweep {sweep_dir.name}", {"peftseg.sweep_dir": str(sweep_dir.resolve()), "peftseg.kind": "sweep"},
            {"sweep.overrides": " ".join(overrides)})
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_FILE).write_text(self._parent)

    def _parent_id(self, config) -> str | None:
        if self._parent is not None:
            return self._parent
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
        except Exception:
            return None
        marker = sweep_dir / PARENT_FILE
        return marker.read_text().strip() if marker.is_file() else None

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        from peftseg.results import FILENAME, read_record

        if not self.available():
            return
        run_dir = Path(str(config.hydra.runtime.output_dir))
        held = self.wait_for_store(log.warning)  # held since the start: said at once, not 20 s per statement
        if held:
            log.warning("MLflow: %s not tracked: its store is still locked by another process after %g s (%s)",
                        run_dir, STORE_WAIT_S, held)
            return
        record_path = run_dir / FILENAME
        record = read_record(record_path).to_dict() if record_path.is_file() else {}
        parent = self._parent_id(config) if config.hydra.mode == RunMode.MULTIRUN else None
        error = None
        if job_return.status == JobStatus.FAILED:
            exc = job_return._return_value
            error = {"type": type(exc).__name__, "message": str(exc)}
        if not record:
            from peftseg.results import flatten_config

            record = {"config": flatten_config(config)}
        self.log_run(run_dir, record, str(config.model.name), str(config.method.name), parent, error)

    def log_run(self, run_dir: Path, record: dict, model: str, method: str, parent: str | None,
                error: dict | None = None, tags: dict[str, str] | None = None) -> str | None:
        """One finished run (its record, curves, artifacts) as an MLflow run, a child of
        `parent` if given; FINISHED if its record is ok, FAILED otherwise. Its run id."""
        name = f"{model} · {method} ({run_dir.name})"
        tags = {"peftseg.run_dir": str(run_dir.resolve()), "peftseg.kind": "run",
                "peftseg.model": model, "peftseg.method": method, **(tags or {})}
        if parent:
            tags["mlflow.parentRunId"] = parent
        try:
            run_id = self.client().create_run(self.experiment_id(), run_name=name[:250], tags=tags).info.run_id
            self._log_params(run_id, record.get("config") or {})
            self._log_metrics(run_id, [(k, v, 0) for k, v in record_metrics(record).items()]
                              + curve_points(run_dir))
            for rel in ARTIFACTS:
                if (run_dir / rel).is_file():
                    self.client().log_artifact(run_id, str(run_dir / rel), artifact_path=str(Path(rel).parent)
                                               if "/" in rel else None)
            ok = record.get("status") == "ok" and error is None
            if not ok:
                error = record.get("error") or error or {"type": "status", "message": str(record.get("status"))}
                self.client().set_tag(run_id, "peftseg.status", str(record.get("status")))
                self.client().set_tag(run_id, "peftseg.error", f"{error.get('type')}: {error.get('message')}"[:5000])
            # a pruned (search) or interrupted run was stopped on purpose: KILLED, not FAILED
            stopped = record.get("status") in ("pruned", "interrupted")
            self.client().set_terminated(run_id, "FINISHED" if ok else "KILLED" if stopped else "FAILED")
            self.announce("run", run_id)
            return run_id
        except Exception as exc:  # tracking must never take a finished run down with it
            log.warning("MLflow tracking of %s failed: %s: %s", run_dir, type(exc).__name__, exc)
            return None

    def on_multirun_end(self, config, **kwargs) -> None:
        if self._parent is None:
            return
        from rich.console import Console

        from peftseg.experiments.sweep import sweep_outcome
        from peftseg.report import build_report

        sweep_dir = Path(str(config.hydra.sweep.dir))
        status = "FINISHED"
        try:
            members, failed = sweep_outcome(sweep_dir, self._sweep_start)
            self.client().set_tag(self._parent, "peftseg.members", str(members))
            self.client().set_tag(self._parent, "peftseg.failed", str(failed))
            status = "FAILED" if failed or not members else "FINISHED"
            build_report(sweep_dir, None, Console(file=open(os.devnull, "w"), width=160))
            for path in sorted(sweep_dir.glob("report.*")) + sorted(sweep_dir.glob("*.png")):
                self.client().log_artifact(self._parent, str(path), artifact_path="report")
        except Exception as exc:  # a sweep with no record yet has no report; still close the run
            log.warning("MLflow: report of sweep %s not logged: %s: %s", sweep_dir, type(exc).__name__, exc)
        self.client().set_terminated(self._parent, status)
