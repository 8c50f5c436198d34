"""One run end to end: data -> model -> method -> params -> train -> eval -> results.json."""

from __future__ import annotations

import logging
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
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


def run(cfg: DictConfig, run_dir: Path, run_id: str) -> dict:
    """Run one experiment; always leaves a results.json (status ok or failed) in run_dir."""
    record = {
        "run": {"id": run_id, "dir": str(run_dir), "start_time": _now(), "end_time": None,
                "seed": cfg.train.seed, "git": git_describe()},
        "config": flatten_config(cfg),
        "params": None, "metrics": None, "efficiency": None,
        "versions": versions(), "status": "running", "error": None,
    }
    start = time.perf_counter()
    try:
        splits = register_dataset(cfg.dataset)
        device = resolve_device(cfg.train.device)
        model = build_model(cfg.model, num_classes=len(splits.class_names))
        model = apply_method(model, cfg.method)
        counts = count_parameters(model)
        record["params"] = counts.to_dict()
        log.info("parameters: %d total, %d trainable (%.3f%%)", counts.total, counts.trainable, 100 * counts.ratio)
        model.to(device)
        outcome = train_and_evaluate(model, splits, cfg, run_dir, device, cfg.model.image_size)
        record["metrics"] = coco_metrics(outcome.eval_results)
        record["efficiency"] = {
            "device": str(device), **outcome.efficiency, "run_wall_time_s": time.perf_counter() - start,
        }
        record["status"] = "ok"
    except BaseException as exc:
        record["status"] = "failed"
        record["error"] = {
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": None if isinstance(exc, UserError) else traceback.format_exc(),
        }
        raise
    finally:
        record["run"]["end_time"] = _now()
        write_record(run_dir, record)
    return record
