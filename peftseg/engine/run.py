"""One run end to end: data -> model -> method -> params -> train -> eval -> results.json."""

from __future__ import annotations

import logging
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from omegaconf import DictConfig, OmegaConf

from peftseg.data import register_dataset
from peftseg.engine.trainer import train_and_evaluate
from peftseg.errors import UserError
from peftseg.methods import apply_method
from peftseg.models import build_model
from peftseg.params import count_parameters
from peftseg.results import coco_metrics, git_describe, versions, write_record

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"train.device={name} was asked for but torch sees no CUDA device on this machine. "
            "Run with train.device=cpu (or train.device=auto), or install a CUDA build of torch."
        )
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"Unknown train.device={name!r}; use train.device=auto, cpu or cuda.")
    return torch.device(name)


def flatten_config(cfg: DictConfig) -> dict:
    """The experiment's knobs as flat `group.key` entries, for tables and CSV."""
    flat = {}
    for group in ("model", "method", "dataset", "train"):
        for key, value in OmegaConf.to_container(cfg[group], resolve=True).items():
            flat[f"{group}.{key}"] = value
    return flat


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_record(cfg: DictConfig, run_dir: Path, run_id: str) -> dict:
    return {
        "run": {"id": run_id, "dir": str(run_dir), "start_time": _now(), "end_time": None,
                "seed": cfg.train.seed, "git": git_describe()},
        "config": flatten_config(cfg),
        "params": None, "metrics": None, "efficiency": None,
        "versions": versions(), "status": "running", "error": None,
    }


def _mark_failed(record: dict, exc: BaseException) -> None:
    record["status"] = "failed"
    record["error"] = {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": None if isinstance(exc, UserError) else traceback.format_exc(),
    }


def failed_record(cfg: DictConfig, run_dir: Path, run_id: str, exc: BaseException) -> dict:
    """The record of a run that died where it could not write one itself (a killed worker)."""
    record = new_record(cfg, run_dir, run_id)
    _mark_failed(record, exc)
    record["run"]["end_time"] = _now()
    return record


def build_for_run(cfg: DictConfig, num_classes: int) -> torch.nn.Module:
    """The model as a run trains it. Seeded first: a randomly initialised base must come
    out identical when `peftseg eval`/`merge`/resume rebuild it around a PEFT checkpoint."""
    seed_all_rng(cfg.train.seed)
    model = build_model(cfg.model, num_classes=num_classes)
    return apply_method(model, cfg.method)


def run(cfg: DictConfig, run_dir: Path, run_id: str) -> dict:
    """Run one experiment; always leaves a results.json (status ok or failed) in run_dir.

    Under multi-process training every rank runs this; only rank 0 writes the record.
    """
    record = new_record(cfg, run_dir, run_id)
    start = time.perf_counter()
    try:
        splits = register_dataset(cfg.dataset)
        device = resolve_device(cfg.train.device)
        model = build_for_run(cfg, len(splits.class_names))
        counts = count_parameters(model)
        record["params"] = counts.to_dict()
        log.info("parameters: %d total, %d trainable (%.3f%%)", counts.total, counts.trainable, 100 * counts.ratio)
        model.to(device)
        meta = {"config": OmegaConf.to_container(cfg, resolve=True), "class_names": list(splits.class_names)}
        outcome = train_and_evaluate(model, splits, cfg, run_dir, device, cfg.model.image_size, meta)
        record["metrics"] = coco_metrics(outcome.eval_results)
        record["efficiency"] = {
            "device": str(device), "num_processes": comm.get_world_size(), **outcome.efficiency,
            "run_wall_time_s": time.perf_counter() - start,
        }
        record["status"] = "ok"
    except BaseException as exc:
        _mark_failed(record, exc)
        raise
    finally:
        record["run"]["end_time"] = _now()
        if comm.is_main_process():
            write_record(run_dir, record)
    return record
