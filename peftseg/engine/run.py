"""One run end to end: data -> model -> method -> params -> train -> eval -> results.json."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import torch
from detectron2.utils import comm
from omegaconf import DictConfig, OmegaConf

from peftseg.checkpoint.files import FINAL
from peftseg.build import build_for_run, resolve_device
from peftseg.data import register_splits
from peftseg.data.subset import training_data
from peftseg.engine.compile import compile_blocks, refuse as refuse_compile
from peftseg.engine.failure import explain
from peftseg.environment import versions
from peftseg.engine.interrupt import RunInterrupted, StopRequest
from peftseg.engine.pruning import EvaluationListener, RunPruned
from peftseg.engine.rundir import clear_earlier_run
from peftseg.engine.threads import torch_threads
from peftseg.engine.trainer import train_and_evaluate
from peftseg.finite import check_result
from peftseg.models import facts_of
from peftseg.params import count_parameters
from peftseg.results import Record, evaluator_metrics, new_record, now, traceback_text, write_record

log = logging.getLogger(__name__)


def _mark_interrupted(record: Record, stop: RunInterrupted, run_dir: Path, resumed_from: str = "") -> None:
    record.status = "interrupted"
    trained = stop.checkpoint is not None and stop.checkpoint.startswith(FINAL)  # stopped in the final evaluation
    record.interrupted = {
        "signal": signal.Signals(stop.signum).name,
        "iteration": stop.iteration,  # the last completed step; None: stopped outside training
        "checkpoint": stop.checkpoint,
        "resume": f"train.resume={run_dir}" if stop.checkpoint and not trained else None,
    }
    if stop.checkpoint is None and resumed_from:
        # a resumed run stopped before its first step: what it resumed from still continues it
        record.interrupted["resume"] = f"train.resume={resumed_from}"
    if trained:  # nothing left to train: what is missing is the evaluation
        record.interrupted["evaluate"] = f"peftseg eval checkpoint={run_dir}"


def _write_record_safely(run_dir: Path, record: Record) -> None:
    try:
        write_record(run_dir, record)
    except OSError as e:  # a full disk or a dir made read-only: the run's own error says more
        log.error("could not write the run record %s (%s)", run_dir / "results.json", e)


def calibration_batches(splits, cfg: DictConfig):
    """What a LoRA start computed from data reads (method.init=eva|corda): the run's own train
    loader (its augmentations, from the first sample, in this process), as a callable of the
    model; None when the method needs no data."""
    method = cfg.method
    init = OmegaConf.select(method, "lora.init" if method.name == "adapter_lora" else "init", default=None)
    if init not in ("eva", "corda"):
        return None
    if comm.get_world_size() > 1:
        from peftseg.errors import UserError

        raise UserError(
            f"method.init={init} computes LoRA's start from training batches in one process; with "
            f"{comm.get_world_size()} processes each would see other batches (and corda would rewrite each "
            "process's base differently). Train it with train.num_gpus=1 and train.num_machines=1, or use "
            "method.init=pissa (computed from the weights alone)."
        )
    from peftseg.data.loading.loaders import train_loader

    def batches(model):
        return train_loader(splits.train, cfg.model.image_size, model.input_format, cfg.train.ims_per_batch, 0,
                            cfg.train.seed, mask_format=splits.mask_format)

    return batches


def run(cfg: DictConfig, run_dir: Path, run_id: str, on_evaluation: EvaluationListener | None = None) -> Record:
    """Run one experiment; leaves a results.json in run_dir: "running" from the start, then
    "ok", "failed" (with the cause) or "interrupted" (with the iteration to resume from).

    Under multi-process training every rank runs this; only rank 0 writes the record.
    `on_evaluation`: called after every evaluation during training (a search's pruner).
    """
    record = new_record(cfg, run_dir, run_id)
    main = comm.is_main_process()
    start = time.perf_counter()
    with StopRequest() as stop, torch_threads(cfg.train.threads):
        try:
            if main:
                clear_earlier_run(run_dir, cfg.train.resume)
                write_record(run_dir, record)  # "running": an earlier run's record is gone now
            splits = register_splits(cfg.dataset)
            for split, notes in splits.notes.items():  # harmless, but never silent
                for kind, count in notes.items():
                    log.warning("dataset %s %s: %d %s", cfg.dataset.name, split, count, kind)
            record.data_notes = splits.notes
            record.data = training_data(splits, cfg.dataset)
            log.info("training images: %d of %d", record.data["train_images"], record.data["train_images_available"])
            device = resolve_device(cfg.train.device)
            refuse_compile(cfg, device.type)  # before minutes of model building
            model = build_for_run(cfg, len(splits.class_names), splits.class_names,
                                  calibration=calibration_batches(splits, cfg))
            counts = count_parameters(model)
            record.params = counts.to_dict()
            log.info("parameters: %d total, %d trainable (%.3f%%)", counts.total, counts.trainable, 100 * counts.ratio)
            model.to(device)
            # after the model is complete (method, checkpointing) and on its device; in place, so the
            # checkpoints' keys are the uncompiled ones. Not in build_for_run: loading a checkpoint of a
            # compiled run (eval, merge, export) rebuilds an eager model
            compiled = compile_blocks(model) if cfg.train.compile else 0
            # versions: what the checkpoints were made with (loading warns when they moved, and
            # converts what a library changed the meaning of: peftseg.checkpoint.provenance)
            meta = {"config": OmegaConf.to_container(cfg, resolve=True), "class_names": list(splits.class_names),
                    "versions": versions()}
            outcome = train_and_evaluate(model, splits, cfg, run_dir, device, cfg.model.image_size, meta, stop,
                                         on_evaluation)
            record.metrics = evaluator_metrics(outcome.eval_results)
            record.rank_budget = outcome.rank_budget
            # COCOEvaluator returns the numbers on rank 0 only (the others get {})
            if comm.is_main_process():  # entries COCOeval leaves undefined are stored null, with the reason
                undefined = check_result(record.metrics, f"evaluation on {splits.val!r}", "this run has")
                if undefined:
                    record.data_notes = {**record.data_notes, "val": {**record.data_notes.get("val", {}), **undefined}}
            record.efficiency = {
                "device": str(device), "num_processes": comm.get_world_size(), **outcome.efficiency,
                "threads": torch.get_num_threads(),  # torch's CPU threads per process, as the run used them
                # memory options as they ran: blocks recomputed in backward, frozen-weight storage
                "checkpointed_blocks": facts_of(model).checkpointed_blocks,
                "base_dtype": facts_of(model).base_dtype,
                # seconds the method's non-default initialisation took (LoRA's method.init: the
                # SVDs of pissa, eva's and corda's passes over training batches); null: none ran
                "init_s": facts_of(model).init_seconds,
                "compiled_blocks": compiled,  # blocks torch.compile ran (train.compile), 0: eager
                "run_wall_time_s": time.perf_counter() - start,
            }
            if main:  # an inf step time or a NaN ratio is no more a result than a NaN AP
                check_result(None, "this run's accounting", "this run has", params=record.params,
                             efficiency=record.efficiency, required=())
            record.status = "ok"
        except RunInterrupted as stop_exc:
            _mark_interrupted(record, stop_exc, run_dir, cfg.train.resume)
            raise
        except RunPruned as pruned:
            # the evaluation it was pruned at is kept, under a status no table reads as a result
            record.status = "pruned"
            record.metrics = evaluator_metrics(pruned.results)
            record.pruned = {"iteration": pruned.iteration, "reason": pruned.reason}
            raise
        except BaseException as exc:
            cause = explain(exc, run_dir) if isinstance(exc, Exception) else None
            if cause is not None:
                record.mark_failed(cause, None)
                raise cause from exc
            record.mark_failed(exc, traceback_text(exc))
            raise
        finally:
            record.run.end_time = now()
            if main:
                _write_record_safely(run_dir, record)
    return record
