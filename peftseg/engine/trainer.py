"""Training with detectron2's trainer and hooks; returns the final evaluation and timings."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from detectron2.engine import HookBase, create_ddp_model, hooks
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

from peftseg.compat import start_data_iterator
from peftseg.data.loading.loaders import train_loader
from peftseg.checkpoint.files import FINAL, PeftCheckpointer
from peftseg.engine.efficiency import peak_memory, reset_peak_memory, step_time_stats
from peftseg.engine.evaluate import evaluate
from peftseg.engine.failure import diverged
from peftseg.engine.interrupt import RunInterrupted, StopAtStepBoundary, StopRequest
from peftseg.engine.optim import build_lr_scheduler, build_optimizer, clip_norm_of
from peftseg.engine.precision import make_trainer, run_precision
from peftseg.engine.progress import RichProgress
from peftseg.engine.rank_budget import rank_budget_hook
from peftseg.data.loading.resume_state import rng_untouched, set_rng_state
from peftseg.engine.pruning import EvaluationListener
from peftseg.engine.rundir import trim_metrics
from peftseg.engine.threads import OversubscriptionCheck

log = logging.getLogger(__name__)

@dataclass
class TrainOutcome:
    eval_results: dict = field(default_factory=dict)
    efficiency: dict = field(default_factory=dict)
    # AdaLoRA: the rank budget the allocator ended at (peftseg.engine.rank_budget), else None
    rank_budget: dict | None = None


class _TrainClock(HookBase):
    """Stops the clock when the last step is done, before the final evaluation runs."""

    def __init__(self, outcome: TrainOutcome, ims_per_batch: int, device: torch.device):
        self._outcome, self._ims, self._device = outcome, ims_per_batch, device

    def before_train(self):
        reset_peak_memory(self._device)
        self._start = time.perf_counter()

    def after_train(self):
        eff = self._outcome.efficiency
        eff["train_wall_time_s"] = time.perf_counter() - self._start
        eff.update(step_time_stats(self.trainer.storage, self._ims))
        eff.update(peak_memory(self._device))


def weights_digest(model) -> str:
    """sha256 of the trainable parameters' bytes, in name order: equal digests, equal weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _SameWeightsOnEveryRank(HookBase):
    """After the last step of a multi-process run: the processes' trainable weights must be the
    same bytes (DDP keeps them in step; a process that drifted would make rank 0's checkpoint
    and evaluation one process's weights, not the run's). A difference fails the run."""

    def __init__(self, model):
        self._model = model

    def after_train(self):
        # the loop leaves iter at max_iter only when it ran to the end (a stop or a failure in
        # a step leaves it below, and the other processes may not be here to compare with)
        if comm.get_world_size() == 1 or self.trainer.iter < self.trainer.max_iter:
            return
        digests = comm.all_gather(weights_digest(self._model))
        if len(set(digests)) > 1:
            differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
            raise RuntimeError(f"after training, the trainable weights of process(es) {differ} differ from "
                               f"rank 0's: the processes did not train the same model")
        log.info("trainable weights identical on all %d processes (sha256 %s)", len(digests), digests[0][:16])


class _FinalOnlyAtEnd(hooks.PeriodicCheckpointer):
    """detectron2's periodic checkpointer, minus the periodic file on the last iteration: with
    max_iter a multiple of the period it wrote model_<max_iter-1>.pth beside model_final.pth,
    the same weights twice (plus optimizer state nobody resumes from a finished run)."""

    def after_step(self):
        iteration = self.trainer.iter
        if iteration >= self.trainer.max_iter - 1:
            self.checkpointer.save(f"{self.file_prefix}_final", iteration=iteration)
        else:
            super().after_step()


def _stopped_in_evaluation(signum: int, iteration: int, max_iter: int, checkpointer) -> RunInterrupted:
    """A stop during an evaluation: the final one comes after model_final was written (the
    training is complete, only its evaluation is missing); a periodic one runs at the step
    boundary of `iteration`, whose state is saved as StopAtStepBoundary would have."""
    if iteration >= max_iter - 1:
        return RunInterrupted(signum, max_iter - 1, f"{FINAL}.safetensors")
    name = f"model_{iteration:07d}"
    checkpointer.save(name, iteration=iteration)
    return RunInterrupted(signum, iteration, f"{name}.pth")


def train_and_evaluate(model, splits, cfg, run_dir: Path, device: torch.device, image_size: int,
                       meta: dict, stop: StopRequest | None = None,
                       on_evaluation: EvaluationListener | None = None) -> TrainOutcome:
    """`meta` (resolved config, class names) goes into every checkpoint so it can be rebuilt.
    `stop`: the run's signal handlers; with it, SIGTERM/SIGINT end training at a step boundary.
    `on_evaluation`: called after every evaluation (a search's pruner); it may raise RunPruned."""
    tcfg = cfg.train
    # Per-rank seeds (detectron2's default_setup does the same): ranks draw different
    # augmentations; DDP broadcasts rank 0's weights, so initialisation stays shared.
    seed_all_rng(tcfg.seed + comm.get_rank())
    outcome = TrainOutcome()
    optimizer = build_optimizer(model, tcfg, clip_norm_of(cfg))
    scheduler = build_lr_scheduler(optimizer, tcfg)
    per_rank_batch = tcfg.ims_per_batch // comm.get_world_size()
    checkpointer = PeftCheckpointer(model, save_dir=str(run_dir), meta=meta, per_rank_batch=per_rank_batch,
                                    optimizer=optimizer, scheduler=scheduler)
    start_iter, saved = 0, {}
    if tcfg.resume:
        from peftseg.checkpoint.files import read_checkpoint
        from peftseg.checkpoint.resume import check_resumable

        source, data = read_checkpoint(tcfg.resume)
        # first another model, method or base (load_peft names those), then a finished run, a
        # setting that differs from what the checkpoint ran with, other classes: all refused
        saved = checkpointer.load_peft(source, meta["config"], data, resuming=True)  # works on a copy of data
        check_resumable(source, data, meta["config"], meta["class_names"])
        start_iter = saved.get("iteration", -1) + 1
    resume = saved.get("resume") or {}
    # checkpoints of older versions carry no data position: the batches are fixed-size, so it is this
    skip = resume.get("samples_seen", start_iter * per_rank_batch)
    data = train_loader(splits.train, image_size, model.input_format, tcfg.ims_per_batch, tcfg.num_workers,
                        tcfg.seed, skip=skip, mask_format=splits.mask_format)
    model.train()
    # Frozen parameters are outside DDP's bookkeeping, so frozen backbones need no
    # find_unused_parameters; only trainable ones a forward can skip do (it costs a graph
    # traversal every step). Without it every trainable parameter is used in every step, so
    # the graph is static: static_graph lets DDP fix its buckets after the first step. With
    # it, the used set changes from step to step, which static_graph must not be told. No-op
    # on 1 process.
    ddp_model = create_ddp_model(
        model, broadcast_buffers=False, find_unused_parameters=tcfg.find_unused_parameters,
        static_graph=not tcfg.find_unused_parameters,
        device_ids=[comm.get_local_rank()] if device.type == "cuda" else None,
    )
    precision = run_precision(tcfg, device, model)
    outcome.efficiency["precision"] = precision  # what ran, for the record
    trainer = make_trainer(ddp_model, data, optimizer, precision, device)
    if "rng" in resume:
        # the loader's iterator draws its base seed from torch's RNG when it is made: make it
        # now, then put back the states of the saved step boundary (the uninterrupted run made
        # it before that boundary)
        start_data_iterator(trainer)
        states = resume["rng"]
        if len(states) == comm.get_world_size():
            set_rng_state(states[comm.get_rank()])
        else:
            log.warning("checkpoint has RNG states of %d processes, this run has %d: the resumed run "
                        "draws new random numbers (augmentations differ from an uninterrupted run)",
                        len(states), comm.get_world_size())

    def do_eval():
        try:
            # a stop request ends an evaluation at once, not after it (there is no step to finish)
            with stop.undeferred() if stop is not None else contextlib.nullcontext(), rng_untouched():
                outcome.eval_results = evaluate(model, splits.val, image_size, run_dir / "eval", tcfg.num_workers)
        except RunInterrupted as e:
            raise _stopped_in_evaluation(e.signum, trainer.iter, tcfg.max_iter, checkpointer) from None
        if on_evaluation is not None:  # a search's pruner may stop the run here
            done = trainer.iter + 1
            on_evaluation(done, outcome.eval_results, done >= tcfg.max_iter)
        return outcome.eval_results

    main = comm.is_main_process()  # the other ranks neither print nor write files
    if main:
        trim_metrics(run_dir / "metrics.json", start_iter)  # JSONWriter appends: no repeated iterations
    writers = [JSONWriter(str(run_dir / "metrics.json")), TensorboardXWriter(str(run_dir / "tb"))] if main else []
    if main and not tcfg.progress:
        writers.append(CommonMetricPrinter(tcfg.max_iter))
    budget = rank_budget_hook(model, tcfg.max_iter)  # AdaLoRA only
    trainer.register_hooks([
        hooks.IterationTimer(warmup_iter=tcfg.timing_warmup_iters),
        _TrainClock(outcome, tcfg.ims_per_batch, device),
        hooks.LRScheduler(optimizer, scheduler),
        # after the optimizer step, while this step's gradients are still there; before any
        # checkpoint or evaluation, so both see the weights as the allocation left them
        budget,
        RichProgress(log_period=tcfg.log_period) if tcfg.progress and main else None,  # before EvalHook: bar closes before eval logs
        # more torch threads than free cores: one line with the fix (CPU runs)
        OversubscriptionCheck(device, comm.get_local_size(), tcfg.timing_warmup_iters)
        if main and device.type == "cpu" else None,
        _FinalOnlyAtEnd(
            # period 0: a period past the end, so only model_final is written
            checkpointer, tcfg.checkpoint_period or tcfg.max_iter + 1, max_iter=tcfg.max_iter,
            file_prefix="model",
        ),
        _SameWeightsOnEveryRank(model),  # before the final evaluation, which reads rank 0's weights
        hooks.EvalHook(tcfg.eval_period, do_eval),
        # before the writer: when it stops, the writer's after_train writes the step's metrics
        # (once; detectron2's printer divides by zero when a step is written twice)
        StopAtStepBoundary(stop, checkpointer) if stop is not None else None,
        hooks.PeriodicWriter(writers, period=tcfg.log_period) if writers else None,
    ])
    try:
        trainer.train(start_iter, tcfg.max_iter)
    except FloatingPointError as e:  # detectron2's NaN/inf checks
        raise diverged(e, trainer.iter) from e
    if budget is not None:
        outcome.rank_budget = budget.summary
    final = run_dir / f"{FINAL}.safetensors"
    outcome.efficiency["checkpoint_bytes"] = final.stat().st_size if final.exists() else None
    return outcome
