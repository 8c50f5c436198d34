"""The run record (results.json): schema, write, read — the only place that builds or
parses one. Written through peftseg.io.atomic, so a reader (or a killed run) never sees
a half-written file: either the previous content or the new one.
"""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peftseg.dotted import flatten
from peftseg.environment import versions
from peftseg.finite import as_stored, not_a_result, result_problems
from peftseg.io.atomic import write_json
from peftseg.registry import GROUPS

FILENAME = "results.json"
# 2: schema_version added, metrics keep every number the evaluator returns, versions list
# the whole stack; records without the field are version 1 and read the same way
SCHEMA_VERSION = 2
def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunInfo:
    id: str
    dir: str
    start_time: str
    end_time: str | None = None
    seed: int | None = None
    git: str = "unknown"
    host: str | None = None  # the machine it ran on (None in records of earlier versions)


@dataclass
class Record:
    """One run: what ran (config, versions), what it trained (params), how well (metrics:
    per evaluator task, e.g. segm/bbox AP), at what cost (efficiency), and how it ended."""

    run: RunInfo
    config: dict[str, Any]  # flattened `group.key` values
    status: str = "running"  # running | ok | failed | interrupted | pruned
    params: dict[str, Any] | None = None  # peftseg.params.ParamCounts.to_dict()
    metrics: dict[str, dict[str, float | None]] | None = None
    efficiency: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    # status "interrupted": signal, last completed iteration, checkpoint, how to resume
    interrupted: dict[str, Any] | None = None
    data_notes: dict[str, dict[str, int]] | None = None  # harmless data problems: split -> kind -> count
    # status "pruned" (peftseg search): the iteration whose evaluation a pruner stopped it at, and why
    pruned: dict[str, Any] | None = None
    # the training data as used: train_images (after dataset.train_subset), train_images_available,
    # train_subset, subset_seed (peftseg.data.subset.training_data)
    data: dict[str, Any] | None = None
    # method=adalora: the rank budget it ended at — initial_total, target_total, final_total and
    # `final`, the rank of every adapted layer (peftseg.engine.rank_budget.budget_summary)
    rank_budget: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    # the numbers every table reads; None when the run has none
    def knob(self, key: str) -> Any:
        return self.config.get(key)

    def metric(self, task: str, key: str = "AP") -> float | None:
        return ((self.metrics or {}).get(task) or {}).get(key)

    @property
    def mask_ap(self) -> float | None:
        return self.metric("segm")

    @property
    def train_images(self) -> int | None:
        """Training images the run used (None: a record from before this was recorded)."""
        return (self.data or {}).get("train_images")

    @property
    def box_ap(self) -> float | None:
        return self.metric("bbox")

    @property
    def trainable_ratio(self) -> float | None:
        return (self.params or {}).get("ratio")

    def eff(self, key: str) -> Any:
        return (self.efficiency or {}).get(key)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def mark_failed(self, exc: BaseException, traceback_text: str | None) -> None:
        self.status = "failed"
        self.error = {"type": type(exc).__name__, "message": str(exc), "traceback": traceback_text}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Record":
        """A record as written by any schema version; ValueError if it is not one."""
        if not isinstance(data, dict) or not isinstance(data.get("run"), dict) or not isinstance(data.get("config"), dict):
            raise ValueError("not a peftseg run record (no 'run' and 'config' objects)")
        version = data.get("schema_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"schema_version {version!r} is not a record version (1, 2, …): the file was edited or "
                             "written by another tool")
        if version > SCHEMA_VERSION:
            raise ValueError(f"schema_version {version!r} is newer than this peftseg reads ({SCHEMA_VERSION})")
        run_fields = {f for f in RunInfo.__dataclass_fields__}
        try:
            run = RunInfo(**{k: v for k, v in data["run"].items() if k in run_fields})
        except TypeError as e:
            raise ValueError(f"malformed 'run' section: {e}") from None
        problem = _shape_problem(data)
        if problem:  # what tables, CSV and plots read must be what they expect, or the report breaks
            raise ValueError(f"not a peftseg run record ({problem})")
        return cls(
            run=run, config=data["config"], status=str(data.get("status", "unknown")),
            params=data.get("params"), metrics=data.get("metrics"), efficiency=data.get("efficiency"),
            versions=data.get("versions") or {}, error=data.get("error"), schema_version=version,
            interrupted=data.get("interrupted"), data_notes=data.get("data_notes"), pruned=data.get("pruned"),
            data=data.get("data") if isinstance(data.get("data"), dict) else None,
            rank_budget=data.get("rank_budget") if isinstance(data.get("rank_budget"), dict) else None,
        )


def _number_or_none(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _shape_problem(data: dict) -> str | None:
    for key in ("params", "metrics", "efficiency"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            return f"'{key}' is a {type(data[key]).__name__}, not an object"
    if "status" in data and not isinstance(data["status"], str):
        return "'status' is not text"
    for task, values in (data.get("metrics") or {}).items():
        if not isinstance(values, dict) or not all(_number_or_none(v) for v in values.values()):
            return f"metrics.{task} is not a set of numbers"
    if not _number_or_none((data.get("params") or {}).get("ratio")):
        return "params.ratio is not a number"
    return None


def flatten_config(cfg) -> dict:
    """The experiment's knobs as flat `group.key` entries, for tables and CSV (a knob that is
    itself a group of settings, like adapter_lora's `method.adapter`, stays one entry)."""
    from omegaconf import OmegaConf

    return flatten({group: OmegaConf.to_container(cfg[group], resolve=True) for group in GROUPS}, depth=2)


def new_record(cfg, run_dir: Path, run_id: str) -> Record:
    return Record(
        run=RunInfo(id=run_id, dir=str(run_dir), start_time=now(), seed=cfg.train.seed, git=git_describe(),
                    host=platform.node() or None),
        config=flatten_config(cfg), versions=versions(),
    )


def traceback_text(exc: BaseException) -> str | None:
    """The traceback a failed record keeps: none for a UserError, whose message is the answer."""
    import traceback

    from peftseg.errors import UserError

    return None if isinstance(exc, UserError) else "".join(traceback.format_exception(exc))


def failed_record(cfg, run_dir: Path, run_id: str, exc: BaseException) -> Record:
    """The record of a run that failed where it could not write one itself (a bad config
    value, a killed worker)."""
    record = new_record(cfg, run_dir, run_id)
    record.mark_failed(exc, traceback_text(exc))
    record.run.end_time = now()
    return record


def write_record(run_dir: Path, record: Record) -> Path:
    """Write `record` atomically. An "ok" record whose numbers are not a result (peftseg.finite:
    finite and inside their ranges; runs check them before calling it ok) is written "failed"
    with the reason, whichever code path got it here: "ok" never goes to disk with them.
    COCOeval's -1 ("undefined") is written as null, in records of any status."""
    if record.ok:
        problems = result_problems(record.metrics, record.params, record.efficiency)
        if problems:
            record.status = "failed"
            record.error = {"type": "UserError", "traceback": None,
                            "message": not_a_result("this run's record", "this run has", problems)}
    return write_json(Path(run_dir) / FILENAME, {**record.to_dict(), "metrics": as_stored(record.metrics)})


def read_record(path: Path) -> Record:
    """The record at `path` (a results.json or its run dir); ValueError if it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    return Record.from_dict(data)


def evaluator_metrics(eval_results: dict) -> dict:
    """Every number the evaluator returned, per task, segm first (the number this project
    is about), then the other tasks in the evaluator's order."""
    tasks = sorted(eval_results, key=lambda t: (t != "segm", list(eval_results).index(t)))
    return {t: dict(eval_results[t]) for t in tasks if isinstance(eval_results[t], dict)}


def git_describe() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"
